//! `ringkv counter|set|map`: the convergent data types from the command line.
//!
//! Each write is one APPLY (`docs/PROTOCOL.md` §5.4.2) carrying the command's operations, with
//! `--ttl` or `--no-expiry` as a last expire operation; each read is one GET whose convergent
//! value is printed. The output is meant for scripts:
//!
//! - `counter incr` and `counter get` print the counter's value, a decimal integer;
//! - `set members` prints one element per line, in byte order;
//! - `map get` prints one line per field, `NAME<TAB>KIND<TAB>VALUE`, in name order, KIND being
//!   `register`, `counter`, `flag` (VALUE `on`; a disabled flag is absent) or `set`, which takes
//!   one line per element (`NAME<TAB>set` alone for an empty set).
//!
//! `ringkv get` of a convergent key prints its value in the same form.
//!
//! Elements, names and register values print as text, with a backslash, tab, newline, carriage
//! return, any other control character and any byte that is not UTF-8 escaped as `\\`, `\t`,
//! `\n`, `\r` and `\xHH`, so that every line is exactly one entry whatever the bytes. Arguments
//! are taken as given, unescaped.
//!
//! A missing key prints nothing and exits 1 with "not found" on stderr, as `ringkv get` does; a
//! key holding a plain value, an UPDATE map or another convergent type is an error (exit 2), as
//! is an APPLY the node answers `wrong_type`.
//!
//! Not here: what the operations mean (the node decides), and retries: a `counter incr` that
//! failed may or may not have counted; rerunning it with the same `--op-id` counts it once.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use ringkv_net::{
    Apply, CrdtOp, CrdtType, CrdtValue, FieldOp, FieldValue, Get, GetOk, Message, Sibling,
};

use ringkv_core::bucket::BucketType;
use ringkv_core::crdt::type_name;

use super::{ExpiryOpts, Target, connect, deadline_ms, parse_field, show_context};

/// The options of a write to a convergent data type.
#[derive(clap::Args, Debug)]
pub(super) struct ApplyOpts {
    /// Write quorum for this request [default: the bucket's].
    #[arg(long)]
    w: Option<u8>,
    /// Durable-write quorum for this request [default: the bucket's].
    #[arg(long)]
    dw: Option<u8>,
    /// Id of this operation: the same id sent again is applied once, within the node's window
    /// of recent ids, so a failed increment can be retried without counting twice.
    #[arg(long)]
    op_id: Option<u64>,
    #[command(flatten)]
    expiry: ExpiryOpts,
}

/// The arguments of a read.
#[derive(clap::Args, Debug)]
pub(super) struct ReadArgs {
    #[command(flatten)]
    target: Target,
    /// Read quorum for this request [default: the bucket's].
    #[arg(long)]
    r: Option<u8>,
    /// The key.
    key: String,
}

/// `ringkv counter ...`.
#[derive(Subcommand, Debug)]
pub(super) enum CounterCommand {
    /// Add BY (default 1; negative subtracts) to the counter under KEY; print its new value.
    Incr {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        apply: ApplyOpts,
        /// The key.
        key: String,
        /// What to add.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Print the counter's value (exit 1 if KEY does not exist).
    Get(ReadArgs),
}

/// `ringkv set ...`.
#[derive(Subcommand, Debug)]
pub(super) enum SetCommand {
    /// Add ELEMs to the set under KEY.
    Add {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        apply: ApplyOpts,
        /// The key.
        key: String,
        /// The elements to add.
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Remove ELEMs from the set under KEY: the adds the node has seen (a concurrent add wins).
    Rem {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        apply: ApplyOpts,
        /// The key.
        key: String,
        /// The elements to remove.
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Print the set's elements, one per line (exit 1 if KEY does not exist).
    Members(ReadArgs),
}

/// `ringkv map ...`.
// Parsed once per run, so the size of the update variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub(super) enum MapCommand {
    /// Change fields of the map under KEY. The changes apply in this order: --remove-field,
    /// --set, --incr, --add, --rem, --enable, --disable, then the expiry.
    Update {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        apply: ApplyOpts,
        /// Set the register FIELD to VALUE (repeatable).
        #[arg(long = "set", value_name = "FIELD=VALUE", value_parser = parse_field)]
        sets: Vec<(String, String)>,
        /// Add N (negative subtracts) to the counter FIELD (repeatable).
        #[arg(long = "incr", value_name = "FIELD=N", value_parser = parse_increment)]
        increments: Vec<(String, i64)>,
        /// Add ELEM to the set FIELD (repeatable).
        #[arg(long = "add", value_name = "FIELD=ELEM", value_parser = parse_field)]
        adds: Vec<(String, String)>,
        /// Remove ELEM from the set FIELD (repeatable).
        #[arg(long = "rem", value_name = "FIELD=ELEM", value_parser = parse_field)]
        removes: Vec<(String, String)>,
        /// Enable the flag FIELD (repeatable).
        #[arg(long = "enable", value_name = "FIELD")]
        enables: Vec<String>,
        /// Disable the flag FIELD (repeatable).
        #[arg(long = "disable", value_name = "FIELD")]
        disables: Vec<String>,
        /// Remove FIELD, whatever its kind (repeatable).
        #[arg(long = "remove-field", value_name = "FIELD")]
        remove_fields: Vec<String>,
        /// The key.
        key: String,
    },
    /// Print the map's fields, one line per field or set element (exit 1 if KEY does not exist).
    Get(ReadArgs),
}

/// A `--incr FIELD=N`: split at the first `=`.
fn parse_increment(text: &str) -> Result<(String, i64), String> {
    let (field, n) = parse_field(text)?;
    let n = n
        .parse()
        .map_err(|e| format!("{text:?}: the increment is not an integer: {e}"))?;
    Ok((field, n))
}

fn bytes_of(text: String) -> Bytes {
    Bytes::from(text.into_bytes())
}

/// `ringkv counter ...`.
pub(super) fn counter(command: CounterCommand) -> anyhow::Result<ExitCode> {
    match command {
        CounterCommand::Incr {
            target,
            apply: opts,
            key,
            by,
        } => {
            let ops = vec![CrdtOp::Increment(by)];
            match apply(&target, &opts, key, CrdtType::Counter, ops, true)? {
                Some(CrdtValue::Counter(n)) => println!("{n}"),
                other => bail!("the node answered {other:?} where a counter's value was due"),
            }
            Ok(ExitCode::SUCCESS)
        }
        CounterCommand::Get(args) => print_read(&args, CrdtType::Counter),
    }
}

/// `ringkv set ...`.
pub(super) fn set(command: SetCommand) -> anyhow::Result<ExitCode> {
    let (target, opts, key, ops) = match command {
        SetCommand::Add {
            target,
            apply,
            key,
            elements,
        } => {
            let ops = elements.into_iter().map(|e| CrdtOp::Add(bytes_of(e)));
            (target, apply, key, ops.collect())
        }
        SetCommand::Rem {
            target,
            apply,
            key,
            elements,
        } => {
            let ops = elements.into_iter().map(|e| CrdtOp::Remove(bytes_of(e)));
            (target, apply, key, ops.collect())
        }
        SetCommand::Members(args) => return print_read(&args, CrdtType::Set),
    };
    apply(&target, &opts, key, CrdtType::Set, ops, false)?;
    Ok(ExitCode::SUCCESS)
}

/// `ringkv map ...`.
pub(super) fn map(command: MapCommand) -> anyhow::Result<ExitCode> {
    match command {
        MapCommand::Update {
            target,
            apply: opts,
            sets,
            increments,
            adds,
            removes,
            enables,
            disables,
            remove_fields,
            key,
        } => {
            let field = |name: String, op| CrdtOp::Field {
                name: bytes_of(name),
                op,
            };
            let mut ops: Vec<CrdtOp> = remove_fields
                .into_iter()
                .map(|name| CrdtOp::RemoveField(bytes_of(name)))
                .collect();
            ops.extend(
                sets.into_iter()
                    .map(|(f, v)| field(f, FieldOp::Assign(bytes_of(v)))),
            );
            ops.extend(
                increments
                    .into_iter()
                    .map(|(f, n)| field(f, FieldOp::Increment(n))),
            );
            ops.extend(
                adds.into_iter()
                    .map(|(f, e)| field(f, FieldOp::Add(bytes_of(e)))),
            );
            ops.extend(
                removes
                    .into_iter()
                    .map(|(f, e)| field(f, FieldOp::Remove(bytes_of(e)))),
            );
            ops.extend(enables.into_iter().map(|f| field(f, FieldOp::Enable)));
            ops.extend(disables.into_iter().map(|f| field(f, FieldOp::Disable)));
            if ops.is_empty() && opts.expiry.expiry().is_none() {
                bail!(
                    "nothing to update: give --set, --incr, --add, --rem, --enable, --disable, \
                     --remove-field, --ttl or --no-expiry"
                );
            }
            apply(&target, &opts, key, CrdtType::Map, ops, false)?;
            Ok(ExitCode::SUCCESS)
        }
        MapCommand::Get(args) => print_read(&args, CrdtType::Map),
    }
}

/// Sends one APPLY of `ops` (and the expiry the options ask for) and returns the value the node
/// answered with, which it sends only when `return_value` asks for it.
fn apply(
    target: &Target,
    opts: &ApplyOpts,
    key: String,
    crdt: CrdtType,
    mut ops: Vec<CrdtOp>,
    return_value: bool,
) -> anyhow::Result<Option<CrdtValue>> {
    ops.extend(opts.expiry.expiry().map(CrdtOp::Expire));
    let request = Message::Apply(Apply {
        bucket: target.bucket_or(built_in(crdt)),
        key: bytes_of(key),
        crdt,
        ops,
        op_id: opts.op_id,
        return_value,
        w: opts.w,
        dw: opts.dw,
        timeout_ms: Some(deadline_ms(target)),
    });
    match connect(target)?.request_message(request)? {
        Message::ApplyOk(ok) => Ok(ok.value),
        other => bail!("unexpected reply {}", other.kind()),
    }
}

/// The node's built-in bucket of type `crdt`, where the commands go without `--bucket`.
fn built_in(crdt: CrdtType) -> &'static str {
    let (_, name) = BucketType::BUILT_IN
        .into_iter()
        .find(|(t, _)| t.crdt() == crdt)
        .expect("every type has a built-in bucket");
    name
}

/// Reads the key of `args`, expecting a value of type `crdt`, and prints it; a missing key
/// prints "not found" on stderr and exits 1.
fn print_read(args: &ReadArgs, crdt: CrdtType) -> anyhow::Result<ExitCode> {
    let target = &args.target;
    let request = Message::Get(Get {
        bucket: target.bucket_or(built_in(crdt)),
        key: Bytes::from(args.key.clone().into_bytes()),
        r: args.r,
        timeout_ms: Some(deadline_ms(target)),
    });
    let reply = match connect(target)?.request_message(request)? {
        Message::GetOk(ok) => ok,
        other => bail!("unexpected reply {}", other.kind()),
    };
    show_context(target, &reply.context);
    if target.show_expiry
        && let Some(at) = reply.expires_at_ms
    {
        eprintln!("expires_at_ms {at}");
    }
    let Some(value) = value_of(reply, crdt).with_context(|| args.key.clone())? else {
        eprintln!("not found");
        return Ok(ExitCode::from(1));
    };
    let mut out = std::io::stdout().lock();
    write_value(&mut out, &value).context("write to stdout")?;
    out.flush().context("write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// The value a GET found, if it is of type `crdt`; `None` for a missing key, an error for a key
/// holding anything else.
fn value_of(reply: GetOk, crdt: CrdtType) -> anyhow::Result<Option<CrdtValue>> {
    if let Some(value) = reply.crdt {
        let found = type_of(&value);
        if found != crdt {
            bail!(
                "the key holds a {}, not a {}",
                type_name(found),
                type_name(crdt)
            );
        }
        return Ok(Some(value));
    }
    // Only a node of an older version answers a map in this form.
    if reply.fields.is_some() {
        bail!("the key holds a map of registers (an older node's form); read it with `ringkv get`");
    }
    if reply
        .siblings
        .iter()
        .any(|s| matches!(s, Sibling::Value(_)))
    {
        bail!("the key holds a plain value; read it with `ringkv get`");
    }
    Ok(None)
}

fn type_of(value: &CrdtValue) -> CrdtType {
    match value {
        CrdtValue::Counter(_) => CrdtType::Counter,
        CrdtValue::Set(_) => CrdtType::Set,
        CrdtValue::Map(_) => CrdtType::Map,
    }
}

/// Prints a value in the forms of the module doc (`ringkv get` of a convergent key, too).
pub(super) fn write_value(out: &mut impl Write, value: &CrdtValue) -> std::io::Result<()> {
    match value {
        CrdtValue::Counter(n) => writeln!(out, "{n}"),
        CrdtValue::Set(elements) => {
            for e in elements {
                writeln!(out, "{}", escape(e))?;
            }
            Ok(())
        }
        CrdtValue::Map(fields) => {
            for (name, field) in fields {
                let name = escape(name);
                match field {
                    FieldValue::Register(v) => writeln!(out, "{name}\tregister\t{}", escape(v))?,
                    FieldValue::Counter(n) => writeln!(out, "{name}\tcounter\t{n}")?,
                    FieldValue::Flag => writeln!(out, "{name}\tflag\ton")?,
                    FieldValue::Set(elements) if elements.is_empty() => {
                        writeln!(out, "{name}\tset")?
                    }
                    FieldValue::Set(elements) => {
                        for e in elements {
                            writeln!(out, "{name}\tset\t{}", escape(e))?;
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

/// `bytes` as one line of text: UTF-8 as it is, except for the escapes of the module doc.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                // Every control character is ASCII or in U+0080..=U+009F; only the ASCII
                // ones are escaped as a byte, the others are left as the UTF-8 they are.
                c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from([&["ringkv"], args].concat())
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    /// `counter incr` takes an optional, possibly negative, amount (1 by default), an op id
    /// and the write options.
    #[test]
    fn counter_commands_parse() {
        match parse(&["counter", "incr", "hits"]) {
            Command::Counter {
                command: CounterCommand::Incr { key, by, apply, .. },
            } => {
                assert_eq!((key.as_str(), by, apply.op_id), ("hits", 1, None));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["counter", "incr", "--op-id", "9", "--w", "2", "hits", "-5"]) {
            Command::Counter {
                command: CounterCommand::Incr { by, apply, .. },
            } => {
                assert_eq!((by, apply.op_id, apply.w), (-5, Some(9), Some(2)));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["counter", "get", "--r", "1", "hits"]),
            Command::Counter {
                command: CounterCommand::Get(ReadArgs { r: Some(1), .. })
            }
        ));
        assert!(Cli::try_parse_from(["ringkv", "counter", "incr", "k", "x"]).is_err());
    }

    /// `set add` and `set rem` need at least one element; `--ttl` becomes an expiry.
    #[test]
    fn set_commands_parse() {
        match parse(&["set", "add", "--ttl", "30s", "tags", "a", "b"]) {
            Command::Set {
                command:
                    SetCommand::Add {
                        key,
                        elements,
                        apply,
                        ..
                    },
            } => {
                assert_eq!(key, "tags");
                assert_eq!(elements, ["a", "b"]);
                assert_eq!(
                    apply.expiry.expiry(),
                    Some(ringkv_net::Expiry::Ttl { ms: 30_000 })
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["ringkv", "set", "add", "tags"]).is_err());
        assert!(Cli::try_parse_from(["ringkv", "set", "rem", "tags"]).is_err());
        assert!(matches!(
            parse(&["set", "members", "tags"]),
            Command::Set {
                command: SetCommand::Members(_)
            }
        ));
    }

    /// `map update` takes every kind of field change, repeated; an increment must be an
    /// integer.
    #[test]
    fn map_commands_parse() {
        let command = parse(&[
            "map",
            "update",
            "--set",
            "name=a=b",
            "--incr",
            "visits=-2",
            "--add",
            "tags=x",
            "--rem",
            "tags=y",
            "--enable",
            "admin",
            "--disable",
            "banned",
            "--remove-field",
            "old",
            "--no-expiry",
            "user:1",
        ]);
        let Command::Map {
            command:
                MapCommand::Update {
                    sets,
                    increments,
                    adds,
                    removes,
                    enables,
                    disables,
                    remove_fields,
                    key,
                    apply,
                    ..
                },
        } = command
        else {
            panic!("{command:?}")
        };
        assert_eq!(sets, [("name".to_owned(), "a=b".to_owned())]);
        assert_eq!(increments, [("visits".to_owned(), -2)]);
        assert_eq!(adds, [("tags".to_owned(), "x".to_owned())]);
        assert_eq!(removes, [("tags".to_owned(), "y".to_owned())]);
        assert_eq!(
            (enables, disables),
            (vec!["admin".to_owned()], vec!["banned".to_owned()])
        );
        assert_eq!(remove_fields, ["old"]);
        assert_eq!(key, "user:1");
        assert_eq!(apply.expiry.expiry(), Some(ringkv_net::Expiry::Never));
        assert!(Cli::try_parse_from(["ringkv", "map", "update", "--incr", "v=x", "k"]).is_err());
        assert!(Cli::try_parse_from(["ringkv", "map", "update", "--set", "novalue", "k"]).is_err());
    }

    /// A GET's reply is the value when it holds the type asked for, nothing when the key is
    /// missing, and an error naming what the key holds otherwise.
    #[test]
    fn reads_classify_what_the_key_holds() {
        let reply = |siblings, fields, crdt| GetOk {
            siblings,
            context: Bytes::new(),
            expires_at_ms: None,
            fields,
            crdt,
        };
        let counter = Some(CrdtValue::Counter(3));
        assert_eq!(
            value_of(reply(vec![], None, counter.clone()), CrdtType::Counter).unwrap(),
            counter
        );
        assert_eq!(
            value_of(reply(vec![], None, None), CrdtType::Set).unwrap(),
            None
        );
        let deleted = reply(vec![Sibling::Tombstone], None, None);
        assert_eq!(value_of(deleted, CrdtType::Set).unwrap(), None);
        let wrong = value_of(reply(vec![], None, counter), CrdtType::Set).unwrap_err();
        assert_eq!(wrong.to_string(), "the key holds a counter, not a set");
        let plain = reply(vec![Sibling::Value(b(b"v"))], None, None);
        assert!(
            value_of(plain, CrdtType::Map)
                .unwrap_err()
                .to_string()
                .contains("plain value")
        );
        let map = reply(vec![], Some(vec![]), None);
        assert!(
            value_of(map, CrdtType::Map)
                .unwrap_err()
                .to_string()
                .contains("an older node's form")
        );
    }

    /// Each entry prints on one line of its own, whatever its bytes.
    #[test]
    fn values_print_one_entry_per_line() {
        let print = |value: CrdtValue| {
            let mut out = Vec::new();
            write_value(&mut out, &value).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(print(CrdtValue::Counter(-7)), "-7\n");
        let set = CrdtValue::Set(vec![b(b""), b(b"a b"), b(b"line\nbreak"), b(b"\xff\\\t")]);
        assert_eq!(print(set), "\na b\nline\\nbreak\n\\xff\\\\\\t\n");
        let map = CrdtValue::Map(vec![
            (b(b"c"), FieldValue::Counter(2)),
            (b(b"e"), FieldValue::Set(Vec::new())),
            (b(b"f"), FieldValue::Flag),
            (b(b"n"), FieldValue::Register(b("é\r".as_bytes()))),
            (b(b"s"), FieldValue::Set(vec![b(b"x"), b(b"y")])),
        ]);
        assert_eq!(
            print(map),
            "c\tcounter\t2\ne\tset\nf\tflag\ton\nn\tregister\té\\r\ns\tset\tx\ns\tset\ty\n"
        );
        assert_eq!(escape(b"\x00\x7f"), "\\x00\\x7f");
    }
}
