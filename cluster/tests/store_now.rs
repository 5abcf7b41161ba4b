//! The replica layer's operations that never wait ([`replica::apply_now`]) on a real engine:
//! each answers what the waiting [`replica::apply`] would, and declines, having done nothing,
//! what needs a wait (a synced write, a sync, a value that must be read from disk).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use bytes::Bytes;
use ringkv_cluster::replica;
use ringkv_core::NodeId;
use ringkv_core::coordinator::{Space, StoreKey, StoreOp};
use ringkv_core::object::{Lww, Object, Val};
use ringkv_engine::{Engine, EngineConfig};

fn key(k: &'static [u8]) -> StoreKey {
    StoreKey {
        partition: 3,
        space: Space::Primary,
        bucket: Bytes::from_static(b"b"),
        key: Bytes::from_static(k),
    }
}

fn object(v: &'static [u8]) -> Object {
    Object::Lww(Lww {
        timestamp: 1,
        node: NodeId(1),
        val: Val::Value(Bytes::from_static(v)),
    })
}

fn run(cache_bytes: usize, test: impl AsyncFnOnce(Engine) + Send + 'static) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("store-now-{}-{cache_bytes}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.clone();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let mut cfg = EngineConfig::new(&d);
            cfg.cache_bytes = cache_bytes;
            test(Engine::open(cfg).await.unwrap()).await
        })
        .unwrap()
        .join()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operations_without_a_wait_agree_with_the_waiting_ones() {
    run(1 << 20, async |e| {
        let k = key(b"cart");
        assert_eq!(replica::apply_now(&e, &k, &StoreOp::Read), Some(Ok(None)));
        let write = StoreOp::Write {
            object: object(b"v1"),
            durable: false,
        };
        assert_eq!(replica::apply_now(&e, &k, &write), Some(Ok(None)));
        let read = replica::apply(&e, &k, StoreOp::Read).await;
        assert_eq!(read, Ok(Some(object(b"v1"))));
        assert_eq!(replica::apply_now(&e, &k, &StoreOp::Read), Some(read));
        // A synced write and a sync wait for the disk: declined, nothing written.
        let synced = StoreOp::Write {
            object: object(b"v2"),
            durable: true,
        };
        assert_eq!(replica::apply_now(&e, &k, &synced), None);
        assert_eq!(replica::apply_now(&e, &k, &StoreOp::Sync), None);
        assert_eq!(
            replica::apply(&e, &k, StoreOp::Read).await,
            Ok(Some(object(b"v1")))
        );
        assert_eq!(replica::apply_now(&e, &k, &StoreOp::Remove), Some(Ok(None)));
        assert_eq!(replica::apply(&e, &k, StoreOp::Read).await, Ok(None));
    });
}

#[test]
fn a_value_only_on_disk_is_declined_and_read_by_the_waiting_call() {
    run(0, async |e| {
        let k = key(b"session");
        let write = StoreOp::Write {
            object: object(b"v"),
            durable: false,
        };
        assert_eq!(replica::apply_now(&e, &k, &write), Some(Ok(None)));
        assert_eq!(replica::apply_now(&e, &k, &StoreOp::Read), None);
        assert_eq!(
            replica::apply(&e, &k, StoreOp::Read).await,
            Ok(Some(object(b"v")))
        );
    });
}
