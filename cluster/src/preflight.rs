//! Startup checks for what the runtime needs from the kernel (io_uring, and locked memory), run
//! before any executor starts, so that a node that cannot run says why and what to change instead
//! of failing inside glommio's executor construction; and the translation of the executor
//! failures these checks cannot foresee into the same errors.
//!
//! What glommio (glommio-ng 0.12) needs, as measured on Linux 6.18 with 4 KiB pages:
//!
//! - It refuses to build any executor while RLIMIT_MEMLOCK is below 512 KiB
//!   ([`MEMLOCK_MIN_BYTES`]), whatever the kernel would allow, even with CAP_IPC_LOCK.
//! - Each executor creates three io_uring rings of 128 entries. For a process without
//!   CAP_IPC_LOCK the kernel charges each ring's memory (16 KiB) to RLIMIT_MEMLOCK, so a node
//!   needs [`RING_BYTES_PER_EXECUTOR`] per executor, one per shard plus the signal executor: 512
//!   KiB is enough for 9 shards, not for 10. A ring that does not fit fails with ENOMEM. Root
//!   normally has CAP_IPC_LOCK, and then nothing is charged.
//! - Each executor then registers its 10 MiB IO arena as fixed buffers with each of its rings,
//!   charged the same way. When that does not fit, glommio logs a warning ("registering buffers
//!   in the main ring. Skipping") and runs without registered buffers: IO still works, with an
//!   extra copy per read and write, so this is not a startup error.
//!
//! The charge is per user, not per process: the rings and registered buffers of every process of
//! the same user (another node, any io_uring program) count against the limit of the process
//! asking. [`check`] sees only this node's needs, so a limit shared that way can still fail a
//! shard's executor with ENOMEM; `executor_error` reports that as the same locked-memory error.
//! So can a limit just large enough for the first executors' registered buffers, which then leave
//! too little for later executors' rings. `LimitMEMLOCK=infinity`, or CAP_IPC_LOCK, avoids all of
//! it.
//!
//! Limits: the io_uring probe creates a one-entry ring and closes it, which proves that
//! `io_uring_setup` works for this process, not that the kernel supports every operation glommio
//! uses (a kernel older than glommio's minimum passes the probe and fails later, in glommio's
//! words). EPERM has several causes (the `kernel.io_uring_disabled` sysctl, a seccomp profile, an
//! LSM) that the errno does not tell apart; the message names them. The ring sizes are measured,
//! not read from the kernel: a kernel that sizes rings differently makes the required figure
//! approximate (the ENOMEM mapping still applies). Of the failures, the locked-memory ones can be
//! provoked without changing system-wide settings and the node's tests do so; the io_uring errno
//! mapping is checked by unit tests only.

use glommio::{GlommioError, ReactorErrorKind};

use crate::error::ServeError;

/// Smallest RLIMIT_MEMLOCK, in bytes, under which glommio builds an executor (its
/// `MIN_MEMLOCK_LIMIT`; it gives no way to read it).
pub const MEMLOCK_MIN_BYTES: u64 = 512 << 10;

/// Locked memory the kernel charges for one executor's rings when the process lacks
/// CAP_IPC_LOCK: three rings of 128 entries (glommio's default depth), 16 KiB each.
pub const RING_BYTES_PER_EXECUTOR: u64 = 3 * RING_128_BYTES;

/// Charge of one 128-entry ring: its SQ and CQ rings and 128 SQEs, in whole pages.
const RING_128_BYTES: u64 = 16 << 10;

/// Entries of the probe ring: the smallest ring the kernel accepts.
const PROBE_RING_ENTRIES: u32 = 1;

/// Charge of the probe ring. The kernel frees a closed ring in the background, so it may still
/// count while the executors create theirs.
const PROBE_RING_BYTES: u64 = 8 << 10;

/// CAP_IPC_LOCK's bit in the capability sets (linux/capability.h).
const CAP_IPC_LOCK_BIT: u32 = 14;

/// Why glommio's own check fails, in [`ServeError::LockedMemory`]'s words.
const REFUSED: &str = "glommio (the io_uring runtime) refuses to start under it";

/// The locked memory this process has for io_uring, as [`check`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockBudget {
    /// The soft RLIMIT_MEMLOCK, in bytes; `u64::MAX` when unlimited.
    pub limit_bytes: u64,
    /// Whether the kernel charges this process's rings to the limit (it lacks CAP_IPC_LOCK).
    pub charged: bool,
    /// The least limit the node's executors need, in bytes.
    pub required_bytes: u64,
}

impl MemlockBudget {
    /// The budget of a node of `executors` executors under `limit_bytes`, `charged` or not.
    pub fn new(limit_bytes: u64, charged: bool, executors: usize) -> Self {
        let rings = if charged {
            (executors as u64)
                .saturating_mul(RING_BYTES_PER_EXECUTOR)
                .saturating_add(PROBE_RING_BYTES)
        } else {
            0
        };
        Self {
            limit_bytes,
            charged,
            required_bytes: rings.max(MEMLOCK_MIN_BYTES),
        }
    }

    fn unlimited(&self) -> bool {
        self.limit_bytes == rlimit::INFINITY
    }
}

/// Fails when this process cannot run `executors` glommio executors: RLIMIT_MEMLOCK below what
/// glommio demands or below what their rings are charged, or an io_uring that cannot be created.
/// Answers the budget found, for `executor_error`.
pub fn check(executors: usize) -> Result<MemlockBudget, ServeError> {
    let (limit_bytes, _hard) =
        rlimit::getrlimit(rlimit::Resource::MEMLOCK).map_err(|e| ServeError::Runtime {
            what: "cannot read the locked memory limit (RLIMIT_MEMLOCK)".to_owned(),
            message: e.to_string(),
        })?;
    let budget = MemlockBudget::new(limit_bytes, !has_ipc_lock(), executors);
    if limit_bytes < MEMLOCK_MIN_BYTES {
        return Err(locked_memory(REFUSED.to_owned(), &budget));
    }
    if !budget.unlimited() && limit_bytes < budget.required_bytes {
        return Err(locked_memory(
            format!(
                "the kernel charges {executors} executors' io_uring rings to it ({} bytes each, \
                 as this process lacks CAP_IPC_LOCK)",
                RING_BYTES_PER_EXECUTOR
            ),
            &budget,
        ));
    }
    // The ring is unmapped and its fd closed when dropped, at once.
    match io_uring::IoUring::new(PROBE_RING_ENTRIES) {
        Ok(_ring) => Ok(budget),
        Err(e) => Err(io_uring_error(&e, &budget)),
    }
}

/// Whether this process has CAP_IPC_LOCK in its effective set, from `/proc/self/status`. When
/// that cannot be read, the answer is no: the check may then ask for more than needed, never less.
fn has_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK_BIT) != 0)
}

/// What a failed `io_uring_setup` means, given the budget it ran under.
pub(crate) fn io_uring_error(e: &std::io::Error, budget: &MemlockBudget) -> ServeError {
    let unavailable = |reason: String, hint: &str| ServeError::IoUringUnavailable {
        reason,
        hint: hint.to_owned(),
    };
    match e.raw_os_error() {
        Some(libc::ENOSYS) => unavailable(
            "io_uring_setup answered ENOSYS: this kernel has no io_uring, or a sandbox hides it"
                .to_owned(),
            "run on Linux 5.8 or newer built with CONFIG_IO_URING, outside sandboxes that do not \
             implement io_uring (gVisor, some seccomp profiles)",
        ),
        Some(libc::EPERM | libc::EACCES) => unavailable(
            format!("io_uring_setup was refused ({e})"),
            "check the sysctl kernel.io_uring_disabled (0 allows every process; 1 only members of \
             the group kernel.io_uring_group and CAP_SYS_ADMIN; 2 none) and the container's \
             seccomp profile (Docker's default profile blocks io_uring: allow io_uring_setup, \
             io_uring_enter and io_uring_register, or use --security-opt seccomp=unconfined)",
        ),
        Some(libc::ENOMEM | libc::EAGAIN) if budget.charged && !budget.unlimited() => {
            locked_memory(
                format!(
                    "io_uring_setup failed ({e}); other processes of this user may hold part of \
                     it, as the kernel charges all their io_uring memory to it"
                ),
                budget,
            )
        }
        Some(libc::ENOMEM | libc::EAGAIN) => unavailable(
            format!("io_uring_setup failed ({e}) although no locked-memory limit applies"),
            "the machine, or the memory cgroup of the service or container, is out of memory",
        ),
        _ => unavailable(
            format!("io_uring_setup failed ({e})"),
            "see io_uring_setup(2) for what this error means on this kernel",
        ),
    }
}

/// The error for an executor that glommio could not build: glommio's locked-memory refusal, and
/// rings that do not fit the charged limit (ENOMEM), become [`ServeError::LockedMemory`];
/// anything else a [`ServeError::Runtime`] saying `what` failed.
pub(crate) fn executor_error(
    what: impl Into<String>,
    e: GlommioError<()>,
    budget: &MemlockBudget,
) -> ServeError {
    let what = what.into();
    match e {
        GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(limit_bytes, required_bytes)) => {
            ServeError::LockedMemory {
                cause: REFUSED.to_owned(),
                limit_bytes,
                required_bytes: required_bytes.max(budget.required_bytes),
            }
        }
        GlommioError::IoError(e)
            if budget.charged
                && !budget.unlimited()
                && matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::EAGAIN)) =>
        {
            locked_memory(
                format!(
                    "{what}: its io_uring rings do not fit ({e}); other processes of this user \
                     may hold part of it, as the kernel charges all their io_uring memory to it"
                ),
                budget,
            )
        }
        other => ServeError::Runtime {
            what,
            message: other.to_string(),
        },
    }
}

fn locked_memory(cause: String, budget: &MemlockBudget) -> ServeError {
    ServeError::LockedMemory {
        cause,
        limit_bytes: budget.limit_bytes,
        required_bytes: budget.required_bytes,
    }
}

/// The value cache of a node given no `cache_bytes`: a quarter of the memory the node may use,
/// so a data set that fits in memory is served from it, with the rest left to the index, the
/// engine's buffers, the anti-entropy tables and other processes. 256 MiB where the memory
/// cannot be read.
pub fn default_cache_bytes() -> u64 {
    memory_bytes().map_or(CACHE_BYTES_FALLBACK, |bytes| bytes / 4)
}

/// The default cache where the machine's memory cannot be read.
const CACHE_BYTES_FALLBACK: u64 = 256 << 20;

/// The memory this process may use: the machine's (`MemTotal`), or the cgroup's limit if it is
/// lower (a container).
fn memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total = parse_mem_total(&meminfo)?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|limit| limit.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |limit| limit.min(total)))
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    const LIMIT_8_MIB: u64 = 8 << 20;

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    fn charged(limit_bytes: u64) -> MemlockBudget {
        MemlockBudget::new(limit_bytes, true, 3)
    }

    /// The machines these tests run on run glommio (the node's end-to-end tests need it).
    #[test]
    fn this_machine_passes() {
        check(2).expect("the test machine runs glommio");
    }

    /// glommio's floor holds for any node; the rings' charge grows with the executors, and only
    /// applies without CAP_IPC_LOCK. The figures match what was measured: 512 KiB holds ten
    /// executors (nine shards) and not eleven.
    #[test]
    fn required_locked_memory() {
        assert_eq!(
            MemlockBudget::new(0, false, 64).required_bytes,
            MEMLOCK_MIN_BYTES
        );
        assert_eq!(
            MemlockBudget::new(0, true, 2).required_bytes,
            MEMLOCK_MIN_BYTES
        );
        assert!(MemlockBudget::new(0, true, 10).required_bytes <= MEMLOCK_MIN_BYTES);
        assert!(MemlockBudget::new(0, true, 11).required_bytes > MEMLOCK_MIN_BYTES);
        assert_eq!(
            MemlockBudget::new(0, true, 65).required_bytes,
            65 * RING_BYTES_PER_EXECUTOR + PROBE_RING_BYTES
        );
    }

    /// Each errno of a failed `io_uring_setup` names its cause and what to change.
    #[test]
    fn io_uring_errnos_name_cause_and_fix() {
        let text = io_uring_error(&errno(libc::ENOSYS), &charged(LIMIT_8_MIB)).to_string();
        assert!(text.starts_with("io_uring is not available"), "{text}");
        assert!(text.contains("ENOSYS"), "{text}");
        assert!(text.contains("CONFIG_IO_URING"), "{text}");

        for e in [libc::EPERM, libc::EACCES] {
            let err = io_uring_error(&errno(e), &charged(LIMIT_8_MIB));
            assert!(
                matches!(err, ServeError::IoUringUnavailable { .. }),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(text.contains("kernel.io_uring_disabled"), "{text}");
            assert!(text.contains("seccomp"), "{text}");
        }

        let other = io_uring_error(&errno(libc::EINVAL), &charged(LIMIT_8_MIB));
        assert!(
            matches!(other, ServeError::IoUringUnavailable { .. }),
            "{other:?}"
        );
    }

    /// ENOMEM or EAGAIN under a charged, finite limit is a locked-memory problem reported with
    /// the limit; unlimited or uncharged it cannot be, and the message says memory ran out.
    #[test]
    fn out_of_memory_is_locked_memory_only_when_charged() {
        for e in [libc::ENOMEM, libc::EAGAIN] {
            match io_uring_error(&errno(e), &charged(MEMLOCK_MIN_BYTES)) {
                ServeError::LockedMemory {
                    limit_bytes,
                    required_bytes,
                    ..
                } => {
                    assert_eq!(limit_bytes, MEMLOCK_MIN_BYTES);
                    assert_eq!(required_bytes, MEMLOCK_MIN_BYTES);
                }
                other => panic!("{other:?}"),
            }
            for budget in [
                charged(rlimit::INFINITY),
                MemlockBudget::new(LIMIT_8_MIB, false, 3),
            ] {
                let err = io_uring_error(&errno(e), &budget);
                assert!(
                    matches!(err, ServeError::IoUringUnavailable { .. }),
                    "{err:?}"
                );
                assert!(err.to_string().contains("out of memory"));
            }
        }
    }

    /// glommio's own memlock refusal, and an executor's rings refused with ENOMEM under a
    /// charged limit, become the same typed error as the check's, naming the limit and the fix;
    /// other executor errors keep their text.
    #[test]
    fn executor_failures_about_locked_memory_are_typed() {
        let refused = GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(0, 512 << 10));
        let err = executor_error("shard 0", refused, &charged(0));
        match &err {
            ServeError::LockedMemory {
                limit_bytes,
                required_bytes,
                ..
            } => {
                assert_eq!(*limit_bytes, 0);
                assert_eq!(*required_bytes, MEMLOCK_MIN_BYTES);
            }
            other => panic!("{other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("RLIMIT_MEMLOCK is 0 bytes"), "{text}");
        assert!(text.contains("ulimit -l 512"), "{text}");
        assert!(text.contains("LimitMEMLOCK="), "{text}");

        let rings = GlommioError::IoError(errno(libc::ENOMEM));
        let text = executor_error("shard 7", rings, &charged(MEMLOCK_MIN_BYTES)).to_string();
        assert!(text.starts_with("not enough locked memory"), "{text}");
        assert!(text.contains("shard 7"), "{text}");

        let uncharged = GlommioError::IoError(errno(libc::ENOMEM));
        let budget = MemlockBudget::new(MEMLOCK_MIN_BYTES, false, 3);
        assert!(matches!(
            executor_error("shard 7", uncharged, &budget),
            ServeError::Runtime { .. }
        ));

        let other = GlommioError::IoError(errno(libc::EMFILE));
        match executor_error("shard 3", other, &charged(LIMIT_8_MIB)) {
            ServeError::Runtime { what, .. } => assert_eq!(what, "shard 3"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_cache_is_a_quarter_of_the_memory() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: many kB\n"), None);
        // This machine's memory can be read, so the fallback is not what a node gets here.
        let total = memory_bytes().expect("/proc/meminfo is readable");
        assert_eq!(default_cache_bytes(), total / 4);
    }
}
