//! Damage for decoder fuzzing in unit tests: valid encodings cut short, with bytes overwritten
//! or inserted. Decoders of what comes from disk or from peers (stored objects, cluster state,
//! membership messages) must answer any such input with a value or an error, never a panic;
//! random byte strings rarely get past a decoder's first checks, damaged real encodings do.

use proptest::prelude::*;

/// A mutation of an encoding: cut it, set a byte, or insert one.
#[derive(Clone, Debug)]
pub(crate) enum Damage {
    Cut(prop::sample::Index),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
}

/// Bytes that make counts and counters zero, one or huge more often than chance would.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![Just(0u8), Just(1u8), Just(0xffu8), any::<u8>()]
}

/// One mutation.
pub(crate) fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Cut),
        (any::<prop::sample::Index>(), byte()).prop_map(|(i, x)| Damage::Set(i, x)),
        (any::<prop::sample::Index>(), byte()).prop_map(|(i, x)| Damage::Insert(i, x)),
    ]
}

/// `bytes` with the mutations applied in turn.
pub(crate) fn apply(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        match d {
            Damage::Cut(i) if !bytes.is_empty() => bytes.truncate(i.index(bytes.len())),
            Damage::Set(i, x) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] = *x;
            }
            Damage::Insert(i, x) => {
                let at = i.index(bytes.len() + 1);
                bytes.insert(at, *x);
            }
            _ => {}
        }
    }
    bytes
}
