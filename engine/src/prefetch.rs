//! Hints to the CPU to start loading memory it will read soon; on other architectures than
//! x86-64 they do nothing. Public, so that the node's runtime can hand [`range`] to the sans-IO
//! core, which keeps no architecture code of its own.

/// Bytes of a cache line.
const LINE_BYTES: usize = 64;

/// Starts loading every cache line of the `len` bytes at `start` (a slot of a hash table: a
/// few lines at most). Reads nothing itself.
#[inline]
pub fn range(start: *const u8, len: usize) {
    let first = start as usize / LINE_BYTES;
    let last = start.wrapping_add(len.saturating_sub(1)) as usize / LINE_BYTES;
    for n in 0..=last.saturating_sub(first) {
        line(start.wrapping_add(n * LINE_BYTES));
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
