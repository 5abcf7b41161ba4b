//! Loopback addresses for the servers a run starts (`--spawn-local`, `compare`).
//!
//! Picking a port by binding port 0 and closing the listener leaves a window before the server
//! binds it, and two picks in a row may be handed the same port: the kernel does not remember
//! that the first was promised to someone. Two guards close that window:
//!
//! - within this process a port is handed out at most once (a process-wide set);
//! - every generator process uses its own loopback address, `127.a.b.c` spelled from its pid
//!   (pids fit in 22 bits), so two generators running at once (tests in parallel, two terminals)
//!   never pick the same address, whatever ports the kernel returns. Linux routes all of
//!   127.0.0.0/8 to the loopback interface, so these addresses need no set-up.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, bail};

/// Ports already handed out by this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Fresh ports tried before giving up (each already-used one stays bound meanwhile, so the
/// kernel cannot return it again).
const ATTEMPTS: usize = 64;

/// This process's loopback address: `127.a.b.c` with `a.b.c` the low 24 bits of the pid,
/// never the network (`.0.0.0`) or broadcast (`.255.255.255`) address.
pub(crate) fn loopback_ip() -> Ipv4Addr {
    let pid = std::process::id() & 0x00ff_ffff;
    let pid = pid.clamp(1, 0x00ff_fffe);
    let [_, a, b, c] = pid.to_be_bytes();
    Ipv4Addr::new(127, a, b, c)
}

/// A free address on [`loopback_ip`] no earlier call in this process returned.
pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    let ip = loopback_ip();
    let mut held = Vec::new();
    for _ in 0..ATTEMPTS {
        let listener =
            TcpListener::bind((ip, 0)).with_context(|| format!("binding a free port on {ip}"))?;
        let addr = listener.local_addr()?;
        let mut used = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if used.insert(addr.port()) {
            return Ok(addr);
        }
        held.push(listener);
    }
    bail!("no unused port on {ip} after {ATTEMPTS} attempts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_never_handed_out_twice() {
        let addrs: Vec<SocketAddr> = (0..200).map(|_| free_addr().unwrap()).collect();
        let distinct: BTreeSet<u16> = addrs.iter().map(SocketAddr::port).collect();
        assert_eq!(distinct.len(), addrs.len());
        assert!(addrs.iter().all(|a| a.ip() == loopback_ip()));
    }

    #[test]
    fn the_loopback_address_is_bindable_and_not_special() {
        let ip = loopback_ip();
        assert!(ip.is_loopback());
        assert_ne!(ip.octets()[1..], [0, 0, 0]);
        assert_ne!(ip.octets()[1..], [255, 255, 255]);
        TcpListener::bind((ip, 0)).unwrap();
    }
}
