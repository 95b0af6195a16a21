//! TEMPORARY tracepoints (not committed).
use std::io::Write;
pub fn tp(tag: &str) {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open("/tmp/ssv-tp.txt") {
        let _ = writeln!(f, "{tag} {ns}");
    }
}
