//! redis-benchmark as the second client of `redis-compare`: a client neither side wrote, run
//! against each server right after this generator's cell, measuring the server's CPU time and
//! system calls per request with `perf stat -p SERVER -e task-clock,raw_syscalls:sys_enter`
//! while it runs. Without `perf` the CPU time comes from `/proc/SERVER/stat` (10 ms ticks) and
//! no system calls are counted.
//!
//! redis-benchmark runs on the generator's CPU (the generator pinned itself before starting it),
//! with `-t set|get -c C -P P -d SIZE -r KEYS -n REQUESTS -q`, so its keys are spread over the
//! same key space as the generator's.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail, ensure};

/// What one redis-benchmark run measured of one server.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ServerCost {
    pub(crate) ops_per_sec: f64,
    /// Server CPU time (user and system) per request.
    pub(crate) cpu_us_per_request: f64,
    /// System calls the server made per request, when `perf` could count them.
    pub(crate) syscalls_per_request: Option<f64>,
}

/// The cell to run.
pub(crate) struct Run<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) server_pid: u32,
    pub(crate) server: std::net::SocketAddr,
    pub(crate) op: &'a str,
    pub(crate) connections: usize,
    pub(crate) pipeline: usize,
    pub(crate) keys: u64,
    pub(crate) value_size: usize,
    pub(crate) requests: u64,
    /// Where `perf stat` writes its counts.
    pub(crate) scratch: &'a Path,
}

/// Runs redis-benchmark once and measures the server while it runs.
pub(crate) fn measure(run: &Run<'_>) -> anyhow::Result<ServerCost> {
    ensure!(run.requests > 0, "a redis-benchmark run needs requests");
    let counts = run.scratch.join("perf-stat.txt");
    let _ = fs::remove_file(&counts);
    let mut perf = start_perf(run.server_pid, &counts);
    let cpu_before = proc_cpu_ticks(run.server_pid)?;
    let output = Command::new(run.bin)
        .args(["-h", &run.server.ip().to_string()])
        .args([
            "-p",
            &run.server.port().to_string(),
            "-t",
            &run.op.to_lowercase(),
        ])
        .args(["-c", &run.connections.to_string()])
        .args(["-P", &run.pipeline.to_string()])
        .args(["-d", &run.value_size.to_string()])
        .args(["-r", &run.keys.to_string()])
        .args(["-n", &run.requests.to_string(), "-q"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", run.bin.display()));
    let cpu_after = proc_cpu_ticks(run.server_pid);
    let perf_counts = perf.as_mut().map(|child| stop_perf(child, &counts));
    let output = output?;
    ensure!(
        output.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ops_per_sec = parse_rate(&String::from_utf8_lossy(&output.stdout))
        .context("no 'requests per second' in redis-benchmark's output")?;
    let requests = run.requests as f64;
    let (cpu_ms, syscalls) = match perf_counts {
        Some(Ok((cpu_ms, syscalls))) => (cpu_ms, Some(syscalls)),
        _ => {
            let ticks = cpu_after?.saturating_sub(cpu_before);
            (ticks as f64 * 1000.0 / CLOCK_TICKS_PER_SEC, None)
        }
    };
    Ok(ServerCost {
        ops_per_sec,
        cpu_us_per_request: cpu_ms * 1000.0 / requests,
        syscalls_per_request: syscalls.map(|s| s / requests),
    })
}

/// `USER_HZ`, the unit of `/proc/PID/stat`'s CPU times: 100 on every Linux platform we run on.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// `perf stat` attached to `pid`, or `None` when perf is not there (the CPU time then comes
/// from `/proc`).
fn start_perf(pid: u32, out: &Path) -> Option<Child> {
    Command::new("perf")
        .args(["stat", "-x", ",", "-e", "task-clock,raw_syscalls:sys_enter"])
        .args(["-p", &pid.to_string(), "-o"])
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Stops `perf stat` with SIGINT (it then writes its counts) and reads the server's CPU
/// milliseconds and system calls.
fn stop_perf(child: &mut Child, out: &Path) -> anyhow::Result<(f64, f64)> {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .context("running kill")?;
    ensure!(status.success(), "could not stop perf");
    child.wait().context("waiting for perf")?;
    let text = fs::read_to_string(out).context("reading perf's counts")?;
    parse_perf(&text)
}

/// Task-clock milliseconds and `raw_syscalls:sys_enter` from `perf stat -x ,` output.
fn parse_perf(text: &str) -> anyhow::Result<(f64, f64)> {
    let mut cpu_ms = None;
    let mut syscalls = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(value), Some(event)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        match *event {
            "task-clock" => cpu_ms = value.parse::<f64>().ok(),
            "raw_syscalls:sys_enter" => syscalls = value.parse::<f64>().ok(),
            _ => {}
        }
    }
    match (cpu_ms, syscalls) {
        (Some(cpu), Some(calls)) => Ok((cpu, calls)),
        _ => bail!("perf counted no task-clock or system calls: {text:?}"),
    }
}

/// User plus system CPU ticks of `pid` so far.
fn proc_cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are counted from its closing ')'.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the whole line, the 12th and 13th here.
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// The last "N requests per second" of redis-benchmark's `-q` output.
fn parse_rate(output: &str) -> Option<f64> {
    output
        .split(['\r', '\n'])
        .filter_map(|line| {
            let (before, _) = line.split_once(" requests per second")?;
            before.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_read() {
        let rb = "SET: rps=0.0 (overall: nan) avg_msec=nan\r\
                  SET: 91799.27 requests per second, p50=0.287 msec\n\n";
        assert_eq!(parse_rate(rb), Some(91799.27));
        assert_eq!(parse_rate("nothing"), None);
        let perf = "# started on Sat Dec  5 21:25:53 2026\n\n\
                    3176.25,msec,task-clock,3176248366,100.00,0.829,CPUs utilized\n\
                    661234,,raw_syscalls:sys_enter,3176248366,100.00,,\n";
        assert_eq!(parse_perf(perf).ok(), Some((3176.25, 661234.0)));
        assert!(parse_perf("<not counted>,,task-clock,0,0,,\n").is_err());
        // This process's own CPU time is readable.
        assert!(proc_cpu_ticks(std::process::id()).is_ok());
    }
}
