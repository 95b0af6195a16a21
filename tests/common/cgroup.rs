//! A throw-away cgroup with a memory and/or pids limit that a supervisor (and so its
//! whole workload) is started in: the limits a pod's container really runs under.
//! cgroup v2 (one unified tree) and v1 (one tree per controller) are both handled;
//! where neither can be made (not root, no writable cgroupfs, no such controller) the
//! constructor says why, for the test to print as its skip reason.
//!
//! Dropping it SIGKILLs whatever is still inside and removes the directories.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Bytes of memory (page cache included), swap disallowed where the kernel says so.
    pub memory: Option<u64>,
    /// Processes and threads.
    pub pids: Option<u64>,
}

pub struct Cgroup {
    /// One directory on v2; one per limited controller on v1.
    dirs: Vec<PathBuf>,
    memory_dir: Option<PathBuf>,
    pids_dir: Option<PathBuf>,
    v2: bool,
}

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup path of this process for `controller` ("" for v2's unified tree).
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        format!(
            "cannot write {value:?} to {}: {e}",
            dir.join(file).display()
        )
    })
}

impl Cgroup {
    /// Creates a cgroup named after `tag` with `limits`. `Err` names what is missing.
    pub fn new(tag: &str, limits: Limits) -> Result<Cgroup, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("creating a cgroup needs root".into());
        }
        let name = format!("ssv-test-{tag}-{:08x}", rand::random::<u32>());
        let v2 = Path::new(ROOT).join("cgroup.controllers").exists();
        let mut cg = Cgroup {
            dirs: vec![],
            memory_dir: None,
            pids_dir: None,
            v2,
        };
        if v2 {
            let parent =
                Path::new(ROOT).join(own_path("").unwrap_or_default().trim_start_matches('/'));
            // Controllers must be enabled in the parent's subtree_control; a parent with
            // processes of its own cannot delegate on v2, so use a sibling of ours when
            // ours is not the root and has members.
            let controllers = std::fs::read_to_string(parent.join("cgroup.controllers"))
                .map_err(|e| format!("cgroup v2 at {}: {e}", parent.display()))?;
            for (want, ctrl) in [
                (limits.memory.is_some(), "memory"),
                (limits.pids.is_some(), "pids"),
            ] {
                if want && !controllers.split_whitespace().any(|c| c == ctrl) {
                    return Err(format!(
                        "cgroup v2 controller '{ctrl}' is not available at {}",
                        parent.display()
                    ));
                }
                if want {
                    let _ =
                        std::fs::write(parent.join("cgroup.subtree_control"), format!("+{ctrl}"));
                }
            }
            let dir = parent.join(&name);
            std::fs::create_dir(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            cg.dirs.push(dir.clone());
            if let Some(m) = limits.memory {
                write(&dir, "memory.max", &m.to_string())?;
                let _ = write(&dir, "memory.swap.max", "0");
                cg.memory_dir = Some(dir.clone());
            }
            if let Some(p) = limits.pids {
                write(&dir, "pids.max", &p.to_string())?;
                cg.pids_dir = Some(dir.clone());
            }
        } else {
            for (want, ctrl) in [
                (limits.memory.is_some(), "memory"),
                (limits.pids.is_some(), "pids"),
            ] {
                if !want {
                    continue;
                }
                let mount = Path::new(ROOT).join(ctrl);
                if !mount.join("cgroup.procs").exists() {
                    return Err(format!(
                        "cgroup v1 controller '{ctrl}' is not mounted at {}",
                        mount.display()
                    ));
                }
                let parent = mount.join(own_path(ctrl).unwrap_or_default().trim_start_matches('/'));
                let dir = parent.join(&name);
                std::fs::create_dir(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                cg.dirs.push(dir.clone());
                if ctrl == "memory" {
                    let m = limits.memory.unwrap();
                    write(&dir, "memory.limit_in_bytes", &m.to_string())?;
                    // Without swap accounting this file is absent; there is no swap here anyway.
                    let _ = write(&dir, "memory.memsw.limit_in_bytes", &m.to_string());
                    cg.memory_dir = Some(dir);
                } else {
                    write(&dir, "pids.max", &limits.pids.unwrap().to_string())?;
                    cg.pids_dir = Some(dir);
                }
            }
        }
        Ok(cg)
    }

    pub fn version(&self) -> &'static str {
        if self.v2 {
            "v2"
        } else {
            "v1"
        }
    }

    /// The `cgroup.procs` files a process writes "0" to in order to join (every
    /// controller's on v1). For a `pre_exec` hook: see [`Cgroup::command`].
    pub fn procs_files(&self) -> Vec<std::ffi::CString> {
        self.dirs
            .iter()
            .map(|d| {
                std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .unwrap()
            })
            .collect()
    }

    /// Makes `cmd`'s process join this cgroup before it execs.
    pub fn command(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let files = self.procs_files();
        // SAFETY: the hook only calls open/write/close (async-signal-safe) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for f in &files {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if !ok {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
    }

    /// Pids of every process in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let Some(dir) = self.dirs.first() else {
            return vec![];
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Processes and threads the pids controller counts now.
    pub fn pids_current(&self) -> Option<u64> {
        let d = self.pids_dir.as_ref()?;
        std::fs::read_to_string(d.join("pids.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Memory charged to the cgroup now (bytes).
    pub fn memory_current(&self) -> Option<u64> {
        let d = self.memory_dir.as_ref()?;
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        std::fs::read_to_string(d.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Times the kernel's OOM killer ran in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some(d) = self.memory_dir.as_ref() else {
            return 0;
        };
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(d.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in self.dirs.iter().rev() {
            // A cgroup whose last process just died can be busy for a moment.
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
