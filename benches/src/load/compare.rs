//! `ringkv-bench redis-compare`: ringkv's RESP port against Redis on the same machine, SET and
//! GET of 100-byte values at several connection counts and pipeline depths, in two durability
//! pairings: ringkv `buffered` against Redis without persistence, and ringkv `sync` against
//! Redis with `appendfsync always` (each write on disk before the reply on both sides).
//!
//! Each server runs alone, pinned to `--server-cpu` with taskset (ringkv with one shard); the
//! generator pins itself to `--generator-cpu` before starting any thread, so the two never share
//! a core. Each server gets one preload of the key space (50 connections × 16 in flight), then
//! every (operation, connections, pipeline) cell is a closed-loop run of `--duration` after a
//! warm-up. The result is one table per pairing with ringkv/Redis ratios: ops/s above 1 and p99
//! below 1 favour ringkv. `--append FILE` appends it, with the command and the machine, to a
//! Markdown file (docs/BENCHMARKS.md).
//!
//! ringkv's `redis` bucket is configured `n = r = w = 1`, with `dw = 0` in the buffered pairing
//! (a buffered node's default, stated so the table says what ran) and `dw = 1` in the sync
//! pairing.
//!
//! redis-server is taken from `--redis-server` or the PATH; if it is missing it is installed with
//! apt-get (as root, or through sudo). Server processes are stopped (SIGTERM, then SIGKILL) when
//! their pairing ends, on error too, and die with the generator if it is killed.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;

use super::cluster::{die_with_parent, find_ringkv, terminate};
use super::ports::free_addr;
use super::redis_benchmark::{self, ServerCost};
use super::spec::parse_duration;
use super::stats::{RunReport, fmt_us};
use super::{RunArgs, measure};

/// How long a server may take to accept connections.
const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

/// Flags of `ringkv-bench redis-compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Measured length of each cell.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Warm-up of each cell.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Keys (preloaded once per server; GETs and SETs pick them uniformly). 100,000 as the
    /// per-core targets were measured (`redis-benchmark -r 100000`): with 10,000, Redis's whole
    /// table stays in the CPU's caches and pipelined cells measure that.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Connection counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,50")]
    pub connections: Vec<usize>,
    /// Pipeline depths (operations in flight per connection).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub pipelines: Vec<usize>,
    /// Pairings to run: `buffered` (ringkv buffered vs Redis without persistence) and `sync`
    /// (ringkv sync vs Redis appendfsync always).
    #[arg(long, value_delimiter = ',', default_value = "buffered,sync")]
    pub pairings: Vec<String>,
    /// CPU the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// CPU the generator is pinned to.
    #[arg(long, default_value_t = 1)]
    pub generator_cpu: usize,
    /// Runtime threads of the generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The ringkv binary [default: as for --spawn-local].
    #[arg(long)]
    pub ringkv_bin: Option<PathBuf>,
    /// The redis-server binary [default: from the PATH, installed with apt-get if missing].
    #[arg(long)]
    pub redis_server: Option<PathBuf>,
    /// Directory for the servers' data (a real filesystem) [default: target/redis-compare].
    #[arg(long, default_value = "target/redis-compare")]
    pub data_root: PathBuf,
    /// Append the tables, with the command and the machine, to this Markdown file.
    #[arg(long)]
    pub append: Option<PathBuf>,
    /// Requests of the redis-benchmark run after each cell, which measures each server's CPU
    /// and system calls per request; 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    pub redis_benchmark_requests: u64,
}

#[derive(Parser)]
struct RunCli {
    #[command(flatten)]
    run: RunArgs,
}

/// A server process, stopped on drop.
struct Server {
    name: &'static str,
    child: Option<Child>,
}

impl Server {
    fn start(
        name: &'static str,
        cpu: usize,
        bin: &Path,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpu.to_string()])
            .arg(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(fs::File::create(log)?)
            .stderr(fs::File::create(log.with_extension("err"))?)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} under taskset", bin.display()))?;
        Ok(Self {
            name,
            child: Some(child),
        })
    }

    fn wait_listening(&mut self, addr: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_WAIT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("{} exited during startup ({status})", self.name);
            }
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not listen on {addr}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        terminate(child.id());
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: {} did not stop within {SHUTDOWN_WAIT:?}; killed",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// redis-server from the flag or the PATH, installed with apt-get when missing.
fn find_redis(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = which("redis-server") {
        return Ok(p);
    }
    eprintln!("redis-server not found; installing it with apt-get ...");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        ensure!(status.success(), "apt-get {} failed", args.join(" "));
        Ok(())
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "redis-server"])?;
    which("redis-server").context("redis-server is still not on the PATH after installing it")
}

/// Pins this process (and every thread it starts afterwards) to `cpu`.
fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args([
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    ensure!(
        status.success(),
        "taskset could not pin the generator to CPU {cpu}"
    );
    Ok(())
}

/// One measured cell.
struct Cell {
    op: &'static str,
    connections: usize,
    pipeline: usize,
    ringkv: Measured,
    redis: Measured,
}

/// One server's results in one cell: this generator's run, then redis-benchmark's.
struct Measured {
    run: RunReport,
    cost: Option<ServerCost>,
}

fn run_cell(
    args: &CompareArgs,
    addr: &str,
    op: &str,
    connections: usize,
    pipeline: usize,
    preload: bool,
) -> anyhow::Result<RunReport> {
    let mut argv: Vec<String> = vec![
        "run".into(),
        "--target".into(),
        format!("redis://{addr}"),
        "-w".into(),
        "c".into(),
        "--distribution".into(),
        "uniform".into(),
        "--read-share".into(),
        if op == "GET" { "1" } else { "0" }.into(),
        "--keys".into(),
        args.keys.to_string(),
        "--value-size".into(),
        args.value_size.to_string(),
        "--connections".into(),
        connections.to_string(),
        "--pipeline".into(),
        pipeline.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--duration".into(),
        format!("{}ms", args.duration.as_millis()),
        "--warmup".into(),
        format!("{}ms", args.warmup.as_millis()),
        "--quiet".into(),
    ];
    if !preload {
        argv.push("--no-preload".into());
    }
    let cli = RunCli::try_parse_from(&argv).context("building the run's flags")?;
    measure(&cli.run)
}

fn pairing_servers(pairing: &str) -> anyhow::Result<(&'static str, Vec<String>)> {
    Ok(match pairing {
        "buffered" => (
            "buffered",
            vec![
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
            ],
        ),
        "sync" => (
            "sync",
            vec![
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
            ],
        ),
        other => bail!("unknown pairing {other:?} (buffered or sync)"),
    })
}

/// Runs one pairing: each server in turn, every cell.
fn run_pairing(
    args: &CompareArgs,
    pairing: &str,
    ringkv: &Path,
    redis: &Path,
    redis_benchmark: Option<&Path>,
) -> anyhow::Result<Vec<Cell>> {
    let (durability, redis_persistence) = pairing_servers(pairing)?;
    let dir = args.data_root.join(pairing);
    let _ = fs::remove_dir_all(&dir);
    let mut results: Vec<Vec<Measured>> = Vec::new();
    for system in ["ringkv", "redis"] {
        let sys_dir = dir.join(system);
        fs::create_dir_all(&sys_dir)?;
        let sys_dir = sys_dir.canonicalize()?;
        let server_addr = free_addr()?;
        let addr = server_addr.to_string();
        let mut server = if system == "ringkv" {
            // `dw` is what makes a write durable whatever the node's durability mode; a buffered
            // node's default is 0, a sync node's 1. Stated here so the table says what ran.
            let dw = u8::from(durability == "sync");
            let buckets = sys_dir.join("buckets.toml");
            fs::write(
                &buckets,
                format!("[buckets.default]\nn = 1\nr = 1\nw = 1\ndw = {dw}\n"),
            )?;
            let argv = vec![
                "serve".into(),
                "--config".into(),
                buckets.display().to_string(),
                "--shards".into(),
                "1".into(),
                "--listen".into(),
                free_addr()?.to_string(),
                "--resp-listen".into(),
                addr.clone(),
                "--durability".into(),
                durability.to_owned(),
                "--data-dir".into(),
                sys_dir.join("data").display().to_string(),
            ];
            Server::start(
                "ringkv",
                args.server_cpu,
                ringkv,
                &argv,
                &sys_dir.join("server.log"),
            )?
        } else {
            let mut argv = vec![
                "--port".into(),
                server_addr.port().to_string(),
                "--bind".into(),
                server_addr.ip().to_string(),
                "--dir".into(),
                sys_dir.display().to_string(),
                "--daemonize".into(),
                "no".into(),
            ];
            argv.extend(redis_persistence.iter().cloned());
            Server::start(
                "redis-server",
                args.server_cpu,
                redis,
                &argv,
                &sys_dir.join("server.log"),
            )?
        };
        server.wait_listening(&addr)?;
        eprintln!(
            "== {pairing}: {system} on {addr}: preloading {} keys",
            args.keys
        );
        run_cell(args, &addr, "SET", 50, 16, true)?;
        let mut reports = Vec::new();
        let server_pid = server.child.as_ref().map(Child::id);
        for op in ["SET", "GET"] {
            for &c in &args.connections {
                for &p in &args.pipelines {
                    eprintln!("== {pairing}: {system} {op} x{c} pipeline {p}");
                    let run = run_cell(args, &addr, op, c, p, false)?;
                    let cost = match (redis_benchmark, server_pid) {
                        (Some(bin), Some(pid)) if args.redis_benchmark_requests > 0 => {
                            Some(redis_benchmark::measure(&redis_benchmark::Run {
                                bin,
                                server_pid: pid,
                                server: server_addr,
                                op,
                                connections: c,
                                pipeline: p,
                                keys: args.keys,
                                value_size: args.value_size,
                                requests: args.redis_benchmark_requests,
                                scratch: &sys_dir,
                            })?)
                        }
                        _ => None,
                    };
                    reports.push(Measured { run, cost });
                }
            }
        }
        drop(server);
        results.push(reports);
    }
    let redis_reports = results.pop().context("redis results")?;
    let ringkv_reports = results.pop().context("ringkv results")?;
    let mut cells = Vec::new();
    let mut pairs = ringkv_reports.into_iter().zip(redis_reports);
    for op in ["SET", "GET"] {
        for &c in &args.connections {
            for &p in &args.pipelines {
                let (ringkv, redis) = pairs.next().context("a cell is missing")?;
                cells.push(Cell {
                    op,
                    connections: c,
                    pipeline: p,
                    ringkv,
                    redis,
                });
            }
        }
    }
    Ok(cells)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".to_owned()
    }
}

fn table(pairing: &str, cells: &[Cell]) -> String {
    let mut s = String::new();
    let title = match pairing {
        "buffered" => {
            "ringkv `--durability buffered` vs Redis without persistence (`--save '' --appendonly no`)"
        }
        _ => "ringkv `--durability sync` vs Redis `--appendonly yes --appendfsync always`",
    };
    let _ = writeln!(s, "{title}; latencies in µs:\n");
    let _ = writeln!(
        s,
        "| op | conns | pipeline | ringkv ops/s | p50 | p99 | Redis ops/s | p50 | p99 | ops/s ratio | p99 ratio | errors ringkv/Redis |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for c in cells {
        let (k, r) = (&c.ringkv.run, &c.redis.run);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {} | {} | {}/{} |",
            c.op,
            c.connections,
            c.pipeline,
            k.ops_per_sec,
            fmt_us(k.all.p50_us),
            fmt_us(k.all.p99_us),
            r.ops_per_sec,
            fmt_us(r.all.p50_us),
            fmt_us(r.all.p99_us),
            ratio(k.ops_per_sec, r.ops_per_sec),
            ratio(k.all.p99_us, r.all.p99_us),
            k.errors_total,
            r.errors_total,
        );
    }
    s
}

/// The redis-benchmark table of a pairing, if it ran: each server's rate, and its CPU time and
/// system calls per request.
fn cost_table(cells: &[Cell], requests: u64) -> Option<String> {
    let rows: Vec<_> = cells
        .iter()
        .filter_map(|c| Some((c, c.ringkv.cost?, c.redis.cost?)))
        .collect();
    if rows.is_empty() {
        return None;
    }
    let calls = |cost: &ServerCost| {
        cost.syscalls_per_request
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.2}"))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured by redis-benchmark ({requests} requests per cell, same keys and values), with \
         each server's CPU time and system calls per request (`perf stat -p`):\n"
    );
    let _ = writeln!(
        s,
        "| op | conns | pipeline | ringkv ops/s | CPU µs/req | syscalls/req | Redis ops/s | CPU µs/req | syscalls/req | ops/s ratio | CPU ratio |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (c, k, r) in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.2} | {} | {:.0} | {:.2} | {} | {} | {} |",
            c.op,
            c.connections,
            c.pipeline,
            k.ops_per_sec,
            k.cpu_us_per_request,
            calls(&k),
            r.ops_per_sec,
            r.cpu_us_per_request,
            calls(&r),
            ratio(k.ops_per_sec, r.ops_per_sec),
            ratio(k.cpu_us_per_request, r.cpu_us_per_request),
        );
    }
    Some(s)
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the comparison.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    ensure!(
        args.server_cpu != args.generator_cpu,
        "the servers and the generator need different CPUs"
    );
    let ringkv = find_ringkv(args.ringkv_bin.as_deref())?;
    let redis = find_redis(args.redis_server.as_deref())?;
    let version = Command::new(&redis)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // Counted before pinning, which narrows what this process sees to one CPU.
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = load_average();
    pin_self(args.generator_cpu)?;
    // redis-benchmark comes with Redis (Debian's redis-tools, which redis-server depends on).
    let redis_benchmark = which("redis-benchmark");
    if redis_benchmark.is_none() && args.redis_benchmark_requests > 0 {
        eprintln!("warning: redis-benchmark not found; its table is left out");
    }
    let mut out = String::new();
    for pairing in &args.pairings {
        let cells = run_pairing(&args, pairing, &ringkv, &redis, redis_benchmark.as_deref())?;
        let mut t = table(pairing, &cells);
        if let Some(costs) = cost_table(&cells, args.redis_benchmark_requests) {
            t.push('\n');
            t.push_str(&costs);
        }
        println!("{t}");
        out.push_str(&t);
        out.push('\n');
    }
    let _ = fs::remove_dir_all(&args.data_root);
    if let Some(path) = &args.append {
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        let mut text = String::new();
        let _ = writeln!(text, "\n## ringkv vs Redis over RESP (`redis-compare`)\n");
        let _ = writeln!(
            text,
            "Command: `{command}` ({}; {version}; servers pinned to CPU {}, generator to CPU {}, ringkv with one shard, {} s per cell after {} s of warm-up, {} keys of {} B, uniform, closed loop). Machine: {cpus} CPUs, load average {load_before} before and {} after the run.\n",
            if cfg!(debug_assertions) {
                "debug build"
            } else {
                "release build"
            },
            args.server_cpu,
            args.generator_cpu,
            args.duration.as_secs_f64(),
            args.warmup.as_secs_f64(),
            args.keys,
            args.value_size,
            load_average()
        );
        text.push_str(&out);
        let mut existing = fs::read_to_string(path).unwrap_or_default();
        existing.push_str(&text);
        fs::write(path, existing).with_context(|| format!("appending to {}", path.display()))?;
        eprintln!("appended to {}", path.display());
    }
    Ok(())
}
