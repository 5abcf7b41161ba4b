//! Hints to the CPU to start loading memory it will read soon. Public, so that the node's
//! runtime can hand [`first_and_last`] to the sans-IO core, which keeps no architecture code
//! of its own.

/// Starts loading the cache lines of `value` (one or two for a slot of a hash table) into
/// every cache level, without waiting for them.
#[inline]
pub(crate) fn value<T>(value: &T) {
    first_and_last((value as *const T).cast(), std::mem::size_of::<T>());
}

/// Starts loading the cache lines of the first and the last of the `len` bytes at `start`:
/// all of them for up to two lines, as a hash table's slot is. Reads nothing itself.
#[inline]
pub fn first_and_last(start: *const u8, len: usize) {
    line(start);
    let last = start.wrapping_add(len.saturating_sub(1));
    if (last as usize) / 64 != (start as usize) / 64 {
        line(last);
    }
}

/// Starts loading a heap block's bytes as [`value`] does, and the word before them: the
/// allocator's size of the block, which freeing it reads first.
#[inline]
pub(crate) fn block(bytes: &[u8]) {
    let start = bytes.as_ptr();
    line(start.wrapping_sub(8));
    line(start);
    if let Some(last) = bytes.len().checked_sub(1) {
        line(start.wrapping_add(last));
    }
}

#[inline]
fn line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a prefetch only hints the memory system; it reads nothing into the program and
    // cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}
