//! What a parked process costs: CPU time and memory read from /proc.

use super::Pool;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// CPU time of a process, all threads: utime+stime in clock ticks (/proc/PID/stat), and
/// the scheduler's nanoseconds summed over its threads (/proc/PID/task/*/schedstat).
fn cpu(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks = stat
        .rfind(')')
        .map(|i| {
            let f: Vec<&str> = stat[i + 2..].split(' ').collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0);
    let mut ns = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (ticks, ns)
}

/// KiB from smaps_rollup: (rss, private, shared, pss).
fn memory(pid: u32) -> (u64, u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    };
    (
        field("Rss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
        field("Shared_Clean:") + field("Shared_Dirty:"),
        field("Pss:"),
    )
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf reads a constant and has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Per parked pod over a quiet window: memory and CPU per minute, and the gateway's
/// CPU per parked pod (the bench process is the gateway while it waits).
pub async fn idle(pool: &Pool, secs: u64, tini: Option<u32>) -> Value {
    tokio::time::sleep(Duration::from_secs(3)).await; // boot and the last parks settle
    let pids: Vec<u32> = pool.pods.iter().map(|p| p.sup.host_pid()).collect();
    let me = std::process::id();
    let before: Vec<(u64, u64)> = pids.iter().map(|&p| cpu(p)).collect();
    let (gw0, tini0) = (cpu(me), tini.map(cpu));
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let per_min = 60.0 / t.elapsed().as_secs_f64();
    let after: Vec<(u64, u64)> = pids.iter().map(|&p| cpu(p)).collect();
    let (gw1, tini1) = (cpu(me), tini.map(cpu));
    let n = pids.len() as f64;
    let ticks: u64 = before.iter().zip(&after).map(|(b, a)| a.0 - b.0).sum();
    let ns: u64 = before.iter().zip(&after).map(|(b, a)| a.1 - b.1).sum();
    let mems: Vec<(u64, u64, u64, u64)> = pids.iter().map(|&p| memory(p)).collect();
    let mean = |f: fn(&(u64, u64, u64, u64)) -> u64| mems.iter().map(f).sum::<u64>() as f64 / n;
    let mut v = json!({
        "n": pids.len(),
        "window_s": t.elapsed().as_secs_f64(),
        "rss_kib": mean(|m| m.0),
        "private_kib": mean(|m| m.1),
        "shared_kib": mean(|m| m.2),
        "pss_kib": mean(|m| m.3),
        "cpu_ms_per_min_stat": ticks as f64 / clk_tck() * 1e3 / n * per_min,
        "cpu_ms_per_min_sched": ns as f64 / 1e6 / n * per_min,
        "gateway_cpu_ms_per_min_per_pod": (gw1.1 - gw0.1) as f64 / 1e6 / n * per_min,
    });
    if let (Some(pid), Some(a), Some(b)) = (tini, tini0, tini1) {
        let m = memory(pid);
        v["tini"] = json!({
            "rss_kib": m.0, "private_kib": m.1, "shared_kib": m.2, "pss_kib": m.3,
            "cpu_ms_per_min_stat": (b.0 - a.0) as f64 / clk_tck() * 1e3 * per_min,
            "cpu_ms_per_min_sched": (b.1 - a.1) as f64 / 1e6 * per_min,
        });
    }
    v
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
