//! A hint file with a valid CRC but impossible fields (a value digest with the tombstone bit set,
//! a record length that is not a multiple of 8) must be refused like a damaged one: `open` falls
//! back to scanning the segment and serves the key, instead of tripping the index's packing
//! assertions. Random damage is caught by the CRC; this guards against a buggy writer or a
//! crafted file.
#![allow(clippy::unwrap_used)]

mod common;

use ringkv_engine::hint::{self, HintEntry, HintTable};
use ringkv_engine::record::RecordKind;
use ringkv_engine::{Durability, Engine};

fn rewrite_hint(dir: &std::path::Path, f: impl Fn(&mut HintEntry)) {
    let path = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "hint"))
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let t = HintTable::parse(bytes).unwrap();
    let mut entries: Vec<HintEntry> = t.iter().collect();
    for e in &mut entries {
        f(e);
    }
    let mut out = hint::encode(t.header(), &entries);
    out.resize(out.len().next_multiple_of(4096), 0);
    assert!(
        HintTable::parse(out.clone()).is_none(),
        "the crafted hint must be refused"
    );
    std::fs::write(&path, out).unwrap();
}

fn case(f: fn(&mut HintEntry)) {
    common::run(move |dir| async move {
        let cfg = common::config(&dir);
        let e = Engine::open(cfg.clone()).await.unwrap();
        e.put(0, b"key", b"value", Durability::Sync).await.unwrap();
        e.close().await.unwrap();
        rewrite_hint(&dir, f);
        let e = Engine::open(cfg).await.unwrap();
        assert_eq!(
            e.recovery_report().segments_scanned,
            1,
            "the segment was scanned instead"
        );
        assert_eq!(
            e.get(0, b"key").await.unwrap().as_deref(),
            Some(&b"value"[..])
        );
        e.close().await.unwrap();
    });
}

#[test]
fn hint_with_tombstone_bit_in_value_digest_is_refused() {
    case(|e| {
        if e.kind == RecordKind::Put {
            e.version |= 0x8000;
        }
    });
}

#[test]
fn hint_with_unaligned_length_is_refused() {
    case(|e| {
        if e.kind == RecordKind::Put {
            e.len -= 1;
        }
    });
}
