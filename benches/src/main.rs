//! `ringkv-bench`: ringkv's benchmark tool.
//!
//! Commands:
//! - `run` (the default: `ringkv-bench --spawn-local 3` is `ringkv-bench run --spawn-local 3`):
//!   the load generator, YCSB and scenario workloads against a ringkv cluster, a ringkv node's
//!   RESP port or Redis, closed or open loop. See [`ringkv_bench::load`] and
//!   `docs/BENCHMARKS.md`.
//! - `redis-compare`: ringkv's RESP port against Redis, pinned to separate cores, at several
//!   connection counts and pipeline depths, in two durability pairings. See
//!   [`ringkv_bench::load::compare`].
//! - `engine`: the storage engine on one shard (put and get throughput and latency, index memory
//!   per key, restart time), side by side with RocksDB when built with `--features rocksdb`.
//!   See [`engine_bench`].
//!
//! This file only parses the command line and dispatches; every benchmark lives in its module.

mod engine_bench;
mod report;
#[cfg(feature = "rocksdb")]
mod rocks_side;
mod workload;

use clap::{Parser, Subcommand};
use ringkv_bench::load::RunArgs;

/// ringkv benchmarks: the load generator (default) and the engine benchmark.
#[derive(Parser, Debug)]
#[command(
    name = "ringkv-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate load against a ringkv cluster or Redis (the default command).
    Run(RunArgs),
    /// Compare ringkv's RESP port with Redis: SET/GET at several connection counts and
    /// pipeline depths, in two durability pairings.
    RedisCompare(ringkv_bench::load::compare::CompareArgs),
    /// Benchmark the storage engine on one shard (and RocksDB, if built with `--features rocksdb`).
    Engine(engine_bench::EngineArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => ringkv_bench::load::run(cli.run),
        Some(Command::Run(args)) => ringkv_bench::load::run(args),
        Some(Command::RedisCompare(args)) => ringkv_bench::load::compare::run(args),
        Some(Command::Engine(args)) => engine_bench::run(args),
    }
}
