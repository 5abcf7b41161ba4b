//! The node's identity on disk: `<data-dir>/node-identity`, which binds a data directory to one
//! node id for as long as it exists.
//!
//! A node id is also the actor of the node's dotted version vectors, so an id must never be
//! reused by a node that lost the data it wrote under it (module docs of [`crate::node`]). This
//! file makes that the default rather than an operator's discipline:
//!
//! - A node started on an **empty** data directory takes a new identity: the `--node-id` it was
//!   given, or, without one, a random id (at least [`AUTO_ID_MIN`], so it never collides with the
//!   small ids operators pick by hand), and a random 64-bit **incarnation** that names this data
//!   directory. Both are written here before anything else.
//! - Every later start reads the identity back. A `--node-id` that differs is refused: the data
//!   directory belongs to its node, whatever the flags say.
//! - The incarnation travels with the node's membership entry. A node whose data was lost and
//!   that is started again under its old id gets a new incarnation, and membership refuses it
//!   (a join of a known id from another incarnation is refused; a new node that learns from
//!   gossip that its id belongs to another incarnation stops), so it cannot come back unnoticed.
//! - A data directory written before identity files existed (a `cluster-state` file or shard
//!   directories, but no identity) keeps the id it was run with (`--node-id`, default 1) and
//!   gets an incarnation now.
//!
//! The file is text, `ringkv-identity 1`, then `node_id N` and `incarnation HEX` lines, written
//! to a temporary file, synced and renamed, as the cluster-state file is. These functions block
//! (file IO, fsync, `/dev/urandom`): call them before the executors start.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::cluster_state::{CLUSTER_STATE_FILE, replace_file};
use ringkv_core::NodeId;

/// Name of the identity file in the node's data directory.
pub const IDENTITY_FILE: &str = "node-identity";
/// Smallest id a node picks for itself: ids below are left to operators.
pub const AUTO_ID_MIN: u32 = 1 << 16;
/// Largest id a node picks for itself (ids stay positive as signed 32-bit numbers, for tools).
pub const AUTO_ID_MAX: u32 = (1 << 31) - 1;
/// The id of a data directory from before identity files when no `--node-id` is given: what
/// such a node ran as.
pub const LEGACY_ID_DEFAULT: u32 = 1;
/// First line of the file.
const HEADER: &str = "ringkv-identity 1";
/// Largest identity file read back.
const IDENTITY_BYTES_MAX: u64 = 4096;

const _: () = assert!(AUTO_ID_MIN > u16::MAX as u32);
const _: () = assert!(AUTO_ID_MIN < AUTO_ID_MAX);

/// Who this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The node id.
    pub id: NodeId,
    /// Names the data directory this identity was created with; never 0.
    pub incarnation: u64,
    /// The identity was created by this start on an empty data directory: the node holds no
    /// data written under its id, so if the cluster knows the id from another incarnation,
    /// this node is the one that must not use it.
    pub fresh: bool,
    /// The identity is in the data directory's file already; otherwise [`persist`] writes it.
    pub stored: bool,
}

/// Why the node's identity could not be established.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file or the data directory could not be read or written.
    #[error("node identity file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not one this node writes.
    #[error("node identity file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The configured id is not the data directory's.
    #[error(
        "the data directory {dir} belongs to {found}, not to node-{requested} (--node-id): a data \
         directory keeps the identity it was created with; start it without --node-id or with \
         its own id"
    )]
    WrongId {
        /// The data directory.
        dir: PathBuf,
        /// The id in its identity file.
        found: NodeId,
        /// The id asked for.
        requested: u32,
    },
}

/// The identity of `data_dir`: the one in its file, or a new one (module docs) that is not
/// written yet ([`Identity::stored`] false), so that a node refused before it touches its data
/// directory leaves nothing behind. Blocks.
pub fn resolve(data_dir: &Path, requested: Option<u32>) -> Result<Identity, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    if let Some(found) = read(&path)? {
        return match requested {
            Some(r) if r != found.id.0 => Err(IdentityError::WrongId {
                dir: data_dir.to_owned(),
                found: found.id,
                requested: r,
            }),
            _ => Ok(found),
        };
    }
    let fresh = !holds_data(data_dir)?;
    let id = match (requested, fresh) {
        (Some(r), _) => r,
        (None, false) => LEGACY_ID_DEFAULT,
        (None, true) => {
            let span = u64::from(AUTO_ID_MAX - AUTO_ID_MIN) + 1;
            let offset = u32::try_from(random_u64()? % span).expect("below the span, a u32");
            AUTO_ID_MIN + offset
        }
    };
    // Zero is kept for "not known" in membership entries.
    let incarnation = random_u64()?.max(1);
    Ok(Identity {
        id: NodeId(id),
        incarnation,
        fresh,
        stored: false,
    })
}

/// Writes `identity` to `data_dir` unless it is stored there already; returns it as stored.
/// Blocks.
pub fn persist(data_dir: &Path, identity: &Identity) -> Result<Identity, IdentityError> {
    if !identity.stored {
        write(data_dir, identity)?;
    }
    Ok(Identity {
        stored: true,
        ..*identity
    })
}

/// Whether `data_dir` holds anything a node wrote: the cluster-state file or a shard directory.
fn holds_data(data_dir: &Path) -> Result<bool, IdentityError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(IdentityError::Io {
                path: data_dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| IdentityError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == CLUSTER_STATE_FILE || name.starts_with("shard-") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Eight bytes from the kernel's random source.
fn random_u64() -> Result<u64, IdentityError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| IdentityError::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(u64::from_le_bytes(bytes))
}

/// The identity in `path`, or `None` if there is no such file.
fn read(path: &Path) -> Result<Option<Identity>, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let damaged = |reason| IdentityError::Damaged {
        path: path.to_owned(),
        reason,
    };
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if len > IDENTITY_BYTES_MAX {
        return Err(damaged("larger than any identity file"));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let parsed = parse(&text).map_err(damaged)?;
    Ok(Some(parsed))
}

/// Parses the file's text (module docs); the reason when it is not one this node writes.
fn parse(text: &str) -> Result<Identity, &'static str> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("no `ringkv-identity 1` header");
    }
    let (mut id, mut incarnation) = (None, None);
    for line in lines {
        match line.split_once(' ') {
            Some(("node_id", v)) => id = Some(v.parse::<u32>().map_err(|_| "bad node_id")?),
            Some(("incarnation", v)) => {
                incarnation = Some(u64::from_str_radix(v, 16).map_err(|_| "bad incarnation")?)
            }
            _ => return Err("unknown line"),
        }
    }
    let id = id.ok_or("no node_id")?;
    let incarnation = incarnation.ok_or("no incarnation")?;
    if id == 0 || incarnation == 0 {
        return Err("zero node_id or incarnation");
    }
    Ok(Identity {
        id: NodeId(id),
        incarnation,
        fresh: false,
        stored: true,
    })
}

/// The file's text for `identity`.
fn format(identity: &Identity) -> String {
    format!(
        "{HEADER}\nnode_id {}\nincarnation {:016x}\n",
        identity.id.0, identity.incarnation
    )
}

/// Writes `identity` to `data_dir`, atomically and durably.
fn write(data_dir: &Path, identity: &Identity) -> Result<(), IdentityError> {
    replace_file(data_dir, IDENTITY_FILE, format(identity).as_bytes())
        .map_err(|(path, source)| IdentityError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a start does: resolve, then write a new identity.
    fn establish(data_dir: &Path, requested: Option<u32>) -> Result<Identity, IdentityError> {
        persist(data_dir, &resolve(data_dir, requested)?)
    }

    fn dir(name: &str) -> PathBuf {
        // Unit tests have no CARGO_TARGET_TMPDIR; the workspace's target directory serves.
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/unit-tmp")
            .join(format!("identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// An empty directory gets a random id above the operators' range and keeps it; the given
    /// id when there is one; a different id later is refused. Resolving alone writes nothing.
    #[test]
    fn an_empty_directory_gets_an_identity_that_sticks() {
        let d = dir("auto");
        let unwritten = resolve(&d, None).unwrap();
        assert!(!unwritten.stored);
        assert!(!d.exists());
        let first = establish(&d, None).unwrap();
        assert!(first.fresh);
        assert!((AUTO_ID_MIN..=AUTO_ID_MAX).contains(&first.id.0));
        assert_ne!(first.incarnation, 0);
        let again = establish(&d, None).unwrap();
        assert!(!again.fresh);
        assert_eq!((again.id, again.incarnation), (first.id, first.incarnation));
        assert_eq!(establish(&d, Some(first.id.0)).unwrap().id, first.id);
        match establish(&d, Some(7)) {
            Err(IdentityError::WrongId {
                found, requested, ..
            }) => {
                assert_eq!((found, requested), (first.id, 7))
            }
            other => panic!("{other:?}"),
        }

        let d = dir("given");
        let given = establish(&d, Some(7)).unwrap();
        assert_eq!(given.id, NodeId(7));
        assert!(given.fresh);
        // A wiped directory is a new incarnation of the same id.
        std::fs::remove_dir_all(&d).unwrap();
        let wiped = establish(&d, Some(7)).unwrap();
        assert_ne!(wiped.incarnation, given.incarnation);
    }

    /// A directory that holds data but no identity keeps the id it ran with and is not fresh.
    #[test]
    fn a_directory_from_before_identity_files_keeps_its_id() {
        let d = dir("legacy");
        std::fs::create_dir_all(d.join("shard-0")).unwrap();
        let legacy = establish(&d, None).unwrap();
        assert_eq!(legacy.id, NodeId(LEGACY_ID_DEFAULT));
        assert!(!legacy.fresh);
        let d = dir("legacy-given");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(CLUSTER_STATE_FILE), b"x").unwrap();
        assert_eq!(establish(&d, Some(3)).unwrap().id, NodeId(3));
    }

    /// The file round-trips, and anything else is refused as damaged.
    #[test]
    fn the_file_is_checked() {
        let id = Identity {
            id: NodeId(12),
            incarnation: 0xabc,
            fresh: false,
            stored: true,
        };
        assert_eq!(parse(&format(&id)), Ok(id));
        assert!(parse("ringkv-identity 2\nnode_id 1\nincarnation 1\n").is_err());
        assert!(parse("ringkv-identity 1\nnode_id 1\n").is_err());
        assert!(parse("ringkv-identity 1\nnode_id 0\nincarnation 1\n").is_err());
        assert!(parse("ringkv-identity 1\nnode_id x\nincarnation 1\n").is_err());
        assert!(parse("ringkv-identity 1\nnode_id 1\nincarnation 1\nother 2\n").is_err());
    }
}
