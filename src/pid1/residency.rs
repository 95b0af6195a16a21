//! Keeps a warm supervisor's resident set to the code it idles in.
//!
//! A warm pod idles for hours, and its RSS is what a pool of them costs. Nearly all of
//! a parked supervisor's RSS was clean pages of its own binary (~0.7 MiB anon against
//! ~6.8 MiB file-backed, BENCHMARKS.md): boot runs code from all over the image
//! (config, seeding, TLS set-up), and the kernel maps up to 64 KiB of page cache around
//! every fault. Once parked, [`drop_clean_code`] unmaps the binary's clean pages; what
//! idling runs (heartbeats, timers) faults back in from the page cache, and so does the
//! rest on the first exec, at the cost of minor faults. Nothing is read from disk, and
//! nothing private is dropped: only mappings that are not writable and hold no
//! copied-on-write page (so never the relocated RELRO data) are touched.

use std::path::Path;

/// Unmaps the clean pages of this executable's read-only mappings (they stay in the
/// page cache). Returns the bytes released; best effort (RSS only).
pub fn drop_clean_code() -> usize {
    let (Ok(exe), Ok(smaps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/smaps"),
    ) else {
        return 0;
    };
    let mut released = 0;
    let mut current: Option<(usize, usize, usize)> = None; // start, end, rss kB
    for line in smaps.lines() {
        if let Some((start, end)) = clean_candidate(line, &exe) {
            current = Some((start, end, 0));
            continue;
        }
        let Some((start, end, rss)) = current.as_mut() else {
            continue;
        };
        if let Some(v) = line.strip_prefix("Rss:") {
            *rss = kib(v);
        } else if let Some(v) = line.strip_prefix("Anonymous:") {
            // A private copy (a relocation, a breakpoint) would be lost: keep it all.
            if kib(v) == 0 && *rss > 0 {
                // SAFETY: MADV_DONTNEED on a read-only, unmodified file mapping of our
                // own binary drops page-table entries only; the next access faults the
                // identical page back from the page cache.
                let rc = unsafe {
                    libc::madvise(
                        *start as *mut libc::c_void,
                        *end - *start,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc == 0 {
                    released += *rss << 10;
                }
            }
            current = None;
        }
    }
    released
}

fn kib(v: &str) -> usize {
    v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

/// `(start, end)` of a smaps header line of a read-only mapping of `exe`.
fn clean_candidate(line: &str, exe: &Path) -> Option<(usize, usize)> {
    let (start, end) = mapping_of(line, exe)?;
    let perms = line.split(' ').nth(1)?;
    (!perms.contains('w')).then_some((start, end))
}

/// `(start, end)` of a `/proc/self/maps` line that maps `exe`.
fn mapping_of(line: &str, exe: &Path) -> Option<(usize, usize)> {
    // start-end perms offset dev inode path
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let path = fields.nth(4)?.trim_start();
    if Path::new(path) != exe {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    (end > start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_mappings() {
        let exe = Path::new("/usr/bin/sandbox-supervisor");
        let line =
            "55d0c0a00000-55d0c0b2f000 r-xp 00200000 fd:00 1234      /usr/bin/sandbox-supervisor";
        assert_eq!(
            mapping_of(line, exe),
            Some((0x55d0c0a00000, 0x55d0c0b2f000))
        );
        let anon = "7f00c0000000-7f00c0021000 rw-p 00000000 00:00 0 ";
        assert_eq!(mapping_of(anon, exe), None);
        let other = "7f00c0000000-7f00c0021000 r-xp 00000000 fd:00 99     /usr/lib/libc.so.6";
        assert_eq!(mapping_of(other, exe), None);
        let rw =
            "55d0c0c00000-55d0c0c2f000 rw-p 00200000 fd:00 1234      /usr/bin/sandbox-supervisor";
        assert_eq!(
            clean_candidate(rw, exe),
            None,
            "a writable mapping is never dropped"
        );
        assert!(clean_candidate(line, exe).is_some());
        // This test binary's own code is resident, and still runs after the drop.
        assert!(drop_clean_code() > 0);
        assert_eq!(kib(" 1234 kB"), 1234);
    }
}
