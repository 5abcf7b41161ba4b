//! Decoders allocate in proportion to the bytes they were given, never to the sizes those bytes
//! declare.
//!
//! A counting global allocator records every allocation made on the test thread while a decoder
//! runs. Hostile inputs (4 GiB values, 65,535 siblings, a billion RESP arguments, in a few bytes)
//! and thousands of random inputs are decoded; the checks are that an incomplete input allocates
//! nothing at all, and that any other outcome keeps at most a small constant plus a fixed
//! multiple of the input length in use at its peak (1x for frames, whose fields are copied once; more for RESP, whose
//! argument offsets and reply trees cost a few words per element).
//!
//! The test binary holds a single test so no other test's allocations can interleave.
#![allow(clippy::unwrap_used)]
// A global allocator can only be written with `unsafe impl GlobalAlloc`; it forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use ringkv_net::limits::HEADER_BYTES;
use ringkv_net::resp::{RespLimits, decode_command, decode_reply};
use ringkv_net::{Kind, Limits, MAGIC, PROTOCOL_VERSION, decode_frame};

struct Counting;

static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated minus bytes freed since measuring started, and its maximum.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static PEAK_BYTES: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    // Const-initialised and without a destructor, so reading it inside the allocator never
    // allocates or recurses.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Records `grown` more bytes in use (negative when memory is freed).
fn record(grown: isize, is_allocation: bool) {
    if ACTIVE.try_with(Cell::get).unwrap_or(false) {
        if is_allocation {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        let live = LIVE_BYTES.fetch_add(grown, Ordering::Relaxed) + grown;
        PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size() as isize, true);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size() as isize, true);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size as isize - layout.size() as isize, true);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(-(layout.size() as isize), false);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    /// Allocations (and reallocations) made.
    count: usize,
    /// Peak of bytes in use at once.
    peak_bytes: usize,
}

/// Runs `f` with allocation counting on; returns its result (dropped by the caller, uncounted).
fn measure<R>(f: impl FnOnce() -> R) -> (R, Stats) {
    COUNT.store(0, Ordering::Relaxed);
    LIVE_BYTES.store(0, Ordering::Relaxed);
    PEAK_BYTES.store(0, Ordering::Relaxed);
    ACTIVE.with(|a| a.set(true));
    let r = f();
    ACTIVE.with(|a| a.set(false));
    let stats = Stats {
        count: COUNT.load(Ordering::Relaxed),
        peak_bytes: PEAK_BYTES.load(Ordering::Relaxed).max(0) as usize,
    };
    (r, stats)
}

/// Slack for fixed-size allocations (a sibling vector of at most 64 entries, small strings).
const SLACK_BYTES: usize = 4096;

fn check_frame(input: &[u8], worst: &mut f64) {
    let (r, s) = measure(|| decode_frame(input, &Limits::DEFAULT));
    if matches!(r, Ok(None)) {
        assert_eq!(s.count, 0, "incomplete frame allocated: {input:02x?}");
    }
    assert!(
        s.peak_bytes <= input.len() + SLACK_BYTES,
        "{} bytes in use for {} input bytes: {r:?}",
        s.peak_bytes,
        input.len()
    );
    if input.len() >= 1024 {
        *worst = worst.max(s.peak_bytes as f64 / input.len() as f64);
    }
}

fn check_resp(input: &[u8], worst: &mut f64) {
    let l = RespLimits::DEFAULT;
    let (r, s) = measure(|| decode_command(input, &l).map(|o| o.map(|(_, n)| n)));
    if matches!(r, Ok(None)) {
        assert_eq!(s.count, 0, "incomplete command allocated");
    }
    assert!(
        s.peak_bytes <= 10 * input.len() + SLACK_BYTES,
        "command: {} bytes in use for {} input bytes",
        s.peak_bytes,
        input.len()
    );
    if input.len() >= 1024 {
        *worst = worst.max(s.peak_bytes as f64 / input.len() as f64);
    }
    let (r, s) = measure(|| decode_reply(input, &l).map(|o| o.map(|(_, n)| n)));
    if matches!(r, Ok(None)) {
        assert_eq!(s.count, 0, "incomplete reply allocated");
    }
    assert!(
        s.peak_bytes <= 16 * input.len() + SLACK_BYTES,
        "reply: {} bytes in use for {} input bytes",
        s.peak_bytes,
        input.len()
    );
    if input.len() >= 1024 {
        *worst = worst.max(s.peak_bytes as f64 / input.len() as f64);
    }
}

fn header(kind: u8, body_len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(PROTOCOL_VERSION);
    h.push(kind);
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&body_len.to_le_bytes());
    h.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(h.len(), HEADER_BYTES);
    h
}

fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut f = header(kind as u8, body.len() as u32);
    f.extend_from_slice(body);
    f
}

/// xorshift64*: deterministic inputs without pulling proptest's own allocations into the count.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn byte(&mut self) -> u8 {
        // Mostly bytes that are valid tags or tiny lengths, some 0xFF for huge lengths.
        match self.next() % 8 {
            0..=3 => (self.next() % 3) as u8,
            4 => 0xFF,
            _ => self.next() as u8,
        }
    }
}

#[test]
fn decoders_allocate_in_proportion_to_input() {
    let mut frame_worst = 0.0f64;
    let max32 = u32::MAX.to_le_bytes();

    // Hostile frames: huge declared sizes in a handful of bytes.
    let hostile = [
        header(Kind::Put as u8, u32::MAX),
        frame(Kind::GetOk, &[0xFF, 0xFF, 1, 0xFF, 0xFF, 0xFF, 0xFF]),
        frame(Kind::GetOk, &[64, 0, 1, 0xFF, 0xFF, 0xFF, 0x00]),
        frame(Kind::Put, &[0, 0, 0, 0, 0xFF, 0xFF]),
        frame(Kind::Put, &[&[0, 0, 0, 0, 0, 0, 1][..], &max32].concat()),
        frame(Kind::Put, &[&[0, 0, 0, 0, 0, 0, 0][..], &max32].concat()),
        frame(
            Kind::ReplicaPut,
            &[&[0, 0, 0, 0, 0, 0, 0, 0, 0][..], &max32].concat(),
        ),
        frame(Kind::ReplicaGetOk, &[&[1][..], &max32].concat()),
        frame(Kind::Error, &[1, 0, 0xFF, 0xFF]),
        frame(Kind::Hello, &[1, 1, 0xFF]),
        // Convergent values and operations: 4 billion set elements or map fields, a nested
        // set of as many, and 4095 operations, each declared in a few bytes.
        frame(Kind::ApplyOk, &[&[1, 2][..], &max32].concat()),
        frame(Kind::ApplyOk, &[&[1, 3][..], &max32].concat()),
        frame(
            Kind::ApplyOk,
            &[&[1, 3, 1, 0, 0, 0, 1, 0, b's', 3][..], &max32].concat(),
        ),
        frame(Kind::ApplyOk, &[&[1, 2, 1, 0, 0, 0][..], &max32].concat()),
        frame(Kind::Apply, &[0, 0, 0, 0, 0, 0, 1, 0, 0, 0xFF, 0x0F, 1]),
        frame(
            Kind::GetOk,
            &[&[0, 0, 0, 0, 0, 0, 3, 2][..], &max32].concat(),
        ),
    ];
    for input in &hostile {
        let start = std::time::Instant::now();
        check_frame(input, &mut frame_worst);
        assert!(decode_frame(input, &Limits::DEFAULT).is_err() || input.len() == HEADER_BYTES);
        // Not a timing assertion on the code's speed, just a guard against an accidental scan of
        // a declared 4 GiB: anything of that kind takes seconds, not this.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    // Large valid frames: decoding copies each field once.
    let mut get_ok = vec![64, 0];
    for _ in 0..64 {
        get_ok.push(1);
        get_ok.extend_from_slice(&1024u32.to_le_bytes());
        get_ok.extend_from_slice(&[7; 1024]);
    }
    get_ok.extend_from_slice(&0u32.to_le_bytes());
    let mut put = vec![0, 0, 0, 1, b'b', 1, 0, b'k', 0];
    put.extend_from_slice(&(1u32 << 20).to_le_bytes());
    put.extend_from_slice(&vec![9; 1 << 20]);
    for input in [frame(Kind::GetOk, &get_ok), frame(Kind::Put, &put)] {
        check_frame(&input, &mut frame_worst);
        assert!(matches!(
            decode_frame(&input, &Limits::DEFAULT),
            Ok(Some(_))
        ));
    }

    // Random bodies under valid headers of every kind, and every prefix of some of them.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..3000 {
        let kind = Kind::ALL[i % Kind::ALL.len()];
        let len = (rng.next() % 96) as usize;
        let body: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        let input = frame(kind, &body);
        check_frame(&input, &mut frame_worst);
        if i % 50 == 0 {
            for n in 0..input.len() {
                check_frame(&input[..n], &mut frame_worst);
            }
        }
    }

    // Hostile and random RESP.
    let mut resp_worst = 0.0f64;
    let many_args = "a ".repeat(20_000) + "\n";
    let many_bulks = "*20000\r\n".to_owned() + &"$0\r\n\r\n".repeat(20_000);
    let many_elems = "*20000\r\n".to_owned() + &":1\r\n".repeat(20_000);
    let resp_hostile: [&[u8]; 9] = [
        b"*2147483647\r\n",
        b"*65536\r\n$1\r\na\r\n",
        b"*1\r\n$2147483647\r\n",
        b"*1\r\n$16777216\r\nabc",
        b"$16777216\r\nabc",
        b"*65536\r\n*65536\r\n*65536\r\n",
        many_args.as_bytes(),
        many_bulks.as_bytes(),
        many_elems.as_bytes(),
    ];
    for input in resp_hostile {
        check_resp(input, &mut resp_worst);
    }
    let pieces: [&[u8]; 10] = [
        b"*", b"$", b":", b"+", b"\r\n", b"1", b"3", b"-1", b" ", b"a",
    ];
    for _ in 0..3000 {
        let n = (rng.next() % 40) as usize;
        let input: Vec<u8> = (0..n)
            .flat_map(|_| pieces[(rng.next() % pieces.len() as u64) as usize].to_vec())
            .collect();
        check_resp(&input, &mut resp_worst);
    }

    eprintln!(
        "peak bytes in use per input byte, inputs of 1 KiB and more: frames {frame_worst:.2}, \
         resp {resp_worst:.2}"
    );
}
