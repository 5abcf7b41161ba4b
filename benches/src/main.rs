//! `ringkv-bench`: ringkv's benchmark tool.
//!
//! Subcommands:
//! - `engine`: the storage engine on one shard (put and get throughput and latency, index memory
//!   per key, restart time), side by side with RocksDB when built with `--features rocksdb`.
//!   See [`engine_bench`] and `docs/BENCHMARKS.md`.
//!
//! This file only parses the command line and dispatches; every benchmark lives in its module.

mod engine_bench;
mod report;
#[cfg(feature = "rocksdb")]
mod rocks_side;
mod workload;

use clap::{Parser, Subcommand};

/// ringkv benchmarks.
#[derive(Parser, Debug)]
#[command(name = "ringkv-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmark the storage engine on one shard (and RocksDB, if built with `--features rocksdb`).
    Engine(engine_bench::EngineArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Engine(args) => engine_bench::run(args),
    }
}
