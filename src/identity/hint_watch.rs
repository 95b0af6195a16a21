//! Noticing that the claim hint may have changed, without waking a parked supervisor
//! for nothing.
//!
//! The kubelet updates a downward-API volume by writing a new timestamped directory
//! beside the file, swapping the `..data` symlink to it with a rename and removing the
//! old one: every update is an event on the *directory* that holds the annotations file
//! (`IN_CREATE`, `IN_MOVED_TO`, `IN_DELETE`), never on the file we opened. So the
//! directory is watched with inotify on the runtime's reactor (no thread), and any event
//! there means "read again". A slow poll stays behind it, for the changes inotify does
//! not report (gVisor's inotify sees only what is written inside the sandbox, not a
//! host-side kubelet update of a gofer mount). Where no watch can be set up at all
//! (`inotify_init` fails under a low `fs.inotify.max_user_instances`, or `add_watch`
//! under `max_user_watches` or on a filesystem without support) it polls at the old
//! fast interval instead, and says so. No directory at all means no downward API is
//! mounted: nothing can ever appear there, so it neither watches nor polls.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// With a working watch, the poll that covers changes inotify cannot see. It bounds how
/// late a claim hint is noticed there (the gateway's push does not wait for it).
pub const HINT_FALLBACK_POLL: Duration = Duration::from_secs(10);
/// Without a watch: the poll the supervisor always ran before, ~300 wake-ups a minute.
pub const HINT_FAST_POLL: Duration = Duration::from_millis(200);

/// How the annotations file is being watched; logged once when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify on the directory, plus the slow fallback poll.
    Inotify,
    /// No inotify for this directory: the fast poll.
    FastPoll,
    /// The directory was watched and then removed or replaced; polling fast and
    /// re-arming the watch on every tick until it is back.
    Rearming,
    /// No directory: no downward API mounted, no hint will ever come.
    Absent,
}

impl WatchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchMode::Inotify => "inotify",
            WatchMode::FastPoll => "poll",
            WatchMode::Rearming => "rearming",
            WatchMode::Absent => "absent",
        }
    }
}

const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

/// The watch is gone (directory deleted, moved, unmounted): set it up again.
const GONE: AddWatchFlags = AddWatchFlags::IN_DELETE_SELF
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_UNMOUNT)
    .union(AddWatchFlags::IN_IGNORED);

/// `AsyncFd` wants `AsRawFd`, which nix's `Inotify` only offers as `AsFd`.
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

pub struct HintWatch {
    dir: PathBuf,
    fd: Option<AsyncFd<InotifyFd>>,
    wd: Option<WatchDescriptor>,
    mode: WatchMode,
    /// Why there is no watch, for the log.
    why: Option<String>,
    fallback: Duration,
    fast: Duration,
}

impl Drop for HintWatch {
    /// Closing an inotify fd that holds a watch waits for the kernel's fsnotify mark
    /// reaper (an SRCU grace period: up to ~15 ms on a 2-vCPU guest, measured). The watch is
    /// dropped the moment a pushed activation wins, so closing it inline stalled a
    /// runtime thread on the claim's critical path (pool claims at p50 2.6–10 ms instead
    /// of 1.4, BENCHMARKS.md). Deregistered here; the close itself runs on a blocking
    /// thread.
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else {
            return;
        };
        let inotify = fd.into_inner();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || drop(inotify));
            }
            Err(_) => drop(inotify),
        }
    }
}

impl HintWatch {
    /// Watches the directory of `file`. Arm it *before* reading the file: a change
    /// between the read and the first wait is then still an event.
    pub fn new(file: &Path) -> Self {
        Self::with_intervals(file, HINT_FALLBACK_POLL, HINT_FAST_POLL)
    }

    pub fn with_intervals(file: &Path, fallback: Duration, fast: Duration) -> Self {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut w = HintWatch {
            dir,
            fd: None,
            wd: None,
            mode: WatchMode::Absent,
            why: None,
            fallback,
            fast,
        };
        if !w.dir.is_dir() {
            return w;
        }
        match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(io::Error::from)
            .and_then(|i| {
                // SAFETY: the Inotify owns its fd and lives inside the AsyncFd until dropped.
                unsafe { AsyncFd::register_with_interest(InotifyFd(i), Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
            }) {
            Ok(fd) => {
                w.fd = Some(fd);
                w.mode = match w.arm() {
                    Ok(()) => WatchMode::Inotify,
                    Err(e) => {
                        w.why = Some(format!("inotify_add_watch: {e}"));
                        WatchMode::FastPoll
                    }
                };
            }
            Err(e) => {
                w.why = Some(format!("inotify_init: {e}"));
                w.mode = WatchMode::FastPoll;
            }
        }
        w
    }

    pub fn mode(&self) -> WatchMode {
        self.mode
    }

    /// Why there is no inotify watch, when there is none for a reason worth logging.
    pub fn why(&self) -> Option<&str> {
        self.why.as_deref()
    }

    /// How late a change can be noticed at worst in the current mode (`None`: never).
    pub fn guarantee(&self) -> Option<Duration> {
        match self.mode {
            WatchMode::Inotify => Some(self.fallback),
            WatchMode::FastPoll | WatchMode::Rearming => Some(self.fast),
            WatchMode::Absent => None,
        }
    }

    fn arm(&mut self) -> nix::Result<()> {
        let Some(fd) = &self.fd else {
            return Err(nix::errno::Errno::EBADF);
        };
        if let Some(old) = self.wd.take() {
            // Already gone when the kernel sent IN_IGNORED; harmless then.
            let _ = fd.get_ref().0.rm_watch(old);
        }
        self.wd = Some(fd.get_ref().0.add_watch(&self.dir, DIR_EVENTS)?);
        Ok(())
    }

    /// Waits until the file may have changed: an event in the directory, or the
    /// current mode's poll interval. Never returns in `Absent` mode.
    pub async fn changed(&mut self) {
        match self.mode {
            WatchMode::Absent => std::future::pending().await,
            WatchMode::FastPoll => tokio::time::sleep(self.fast).await,
            WatchMode::Rearming => {
                tokio::time::sleep(self.fast).await;
                if self.arm().is_ok() {
                    self.mode = WatchMode::Inotify;
                }
            }
            WatchMode::Inotify => {
                let fallback = self.fallback;
                let gone = tokio::select! {
                    gone = self.drain() => gone,
                    _ = tokio::time::sleep(fallback) => false,
                };
                if gone {
                    // The directory was replaced or removed: watch its successor, or
                    // poll until there is one.
                    self.mode = match self.arm() {
                        Ok(()) => WatchMode::Inotify,
                        Err(_) => WatchMode::Rearming,
                    };
                }
            }
        }
    }

    /// Waits for at least one event and consumes all queued ones; whether the watch
    /// itself went away. A failing inotify fd degrades to the fast poll.
    async fn drain(&mut self) -> bool {
        let Some(fd) = &self.fd else {
            return false;
        };
        // Only the current watch's end counts: removing a replaced directory's watch
        // queues an IN_IGNORED for the old descriptor, which must not re-arm again.
        let current = self.wd;
        let is_gone =
            |e: &nix::sys::inotify::InotifyEvent| e.mask.intersects(GONE) && Some(e.wd) == current;
        let mut gone = false;
        loop {
            let mut guard = match fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    self.why = Some(format!("inotify fd: {e}"));
                    self.mode = WatchMode::FastPoll;
                    return false;
                }
            };
            match guard.try_io(|inner| inner.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) => {
                    // IN_Q_OVERFLOW (events lost) needs nothing more: we read again anyway.
                    gone |= events.iter().any(is_gone);
                    // Consume whatever else is queued without waiting, then report.
                    while let Ok(more) = fd.get_ref().0.read_events() {
                        gone |= more.iter().any(is_gone);
                    }
                    return gone;
                }
                Ok(Err(e)) => {
                    self.why = Some(format!("inotify read: {e}"));
                    self.mode = WatchMode::FastPoll;
                    return false;
                }
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The kubelet's atomic writer: new timestamped dir, `..data_tmp` symlink renamed
    /// over `..data`, the file a symlink through `..data`, the old dir removed.
    fn kubelet_write(dir: &Path, gen: u32, body: &str) {
        let ts = dir.join(format!("..2026_12_03_15_00_{gen:02}.{gen}"));
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("annotations"), body).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
        let old = std::fs::read_link(dir.join("..data")).ok();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        let link = dir.join("annotations");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("..data/annotations", &link).unwrap();
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }

    async fn noticed_within(w: &mut HintWatch, limit: Duration) -> bool {
        tokio::time::timeout(limit, w.changed()).await.is_ok()
    }

    #[tokio::test]
    async fn a_kubelet_style_swap_is_noticed_at_once_despite_a_slow_fallback() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("podinfo");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("annotations");
        let mut w = HintWatch::with_intervals(&file, Duration::from_secs(3600), HINT_FAST_POLL);
        assert_eq!(w.mode(), WatchMode::Inotify, "{:?}", w.why());
        // Nothing happens: no wake-up (the fallback is an hour).
        assert!(!noticed_within(&mut w, Duration::from_millis(300)).await);
        for gen in 1..=3 {
            let started = Instant::now();
            kubelet_write(&dir, gen, &format!("k=\"v{gen}\"\n"));
            assert!(
                noticed_within(&mut w, Duration::from_secs(1)).await,
                "gen {gen}"
            );
            assert!(started.elapsed() < Duration::from_secs(1));
            assert_eq!(
                super::super::read_hint(&file, "k").unwrap().as_deref(),
                Some(format!("v{gen}").as_str())
            );
            // Events of the rest of this swap, then quiet again.
            while noticed_within(&mut w, Duration::from_millis(100)).await {}
        }
        assert_eq!(w.mode(), WatchMode::Inotify);
    }

    #[tokio::test]
    async fn a_replaced_directory_is_watched_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("podinfo");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("annotations");
        let mut w = HintWatch::with_intervals(&file, Duration::from_secs(3600), HINT_FAST_POLL);
        assert_eq!(w.mode(), WatchMode::Inotify);
        std::fs::rename(&dir, tmp.path().join("old")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        // The move is noticed and the watch re-armed on the new directory.
        assert!(noticed_within(&mut w, Duration::from_secs(1)).await);
        while noticed_within(&mut w, Duration::from_millis(100)).await {}
        assert_eq!(w.mode(), WatchMode::Inotify);
        // Changes in the old (moved) directory no longer count; the new one's do.
        std::fs::write(tmp.path().join("old/x"), "").unwrap();
        assert!(!noticed_within(&mut w, Duration::from_millis(300)).await);
        kubelet_write(&dir, 1, "k=\"v\"\n");
        assert!(noticed_within(&mut w, Duration::from_secs(1)).await);
        // Removed outright: polls fast, and re-arms once it is back.
        while noticed_within(&mut w, Duration::from_millis(100)).await {}
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(noticed_within(&mut w, Duration::from_secs(1)).await);
        assert_eq!(w.mode(), WatchMode::Rearming);
        std::fs::create_dir(&dir).unwrap();
        assert!(noticed_within(&mut w, Duration::from_secs(1)).await);
        assert_eq!(w.mode(), WatchMode::Inotify);
    }

    #[tokio::test]
    async fn no_directory_means_no_watch_and_no_poll() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("nope/annotations");
        let mut w =
            HintWatch::with_intervals(&file, Duration::from_millis(10), Duration::from_millis(10));
        assert_eq!(w.mode(), WatchMode::Absent);
        assert_eq!(w.guarantee(), None);
        assert!(!noticed_within(&mut w, Duration::from_millis(200)).await);
    }

    #[tokio::test]
    async fn a_missing_file_in_a_present_directory_is_noticed_when_it_appears() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("annotations");
        let mut w = HintWatch::with_intervals(&file, Duration::from_secs(3600), HINT_FAST_POLL);
        assert_eq!(w.mode(), WatchMode::Inotify);
        // A plain write (not the kubelet's swap) counts too.
        std::fs::write(&file, "k=\"v\"\n").unwrap();
        assert!(noticed_within(&mut w, Duration::from_secs(1)).await);
    }
}
