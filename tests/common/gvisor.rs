//! The gVisor lane: the real binary as PID 1 of a gVisor sandbox (`runsc do`), dialing the
//! reference gateway on this machine (`--network=host`). Each sandbox gets its own runsc
//! state directory (`--root`), so parallel tests never see each other's containers, and
//! every process started for it is ended when the [`Gvisor`] guard drops.
//!
//! Nothing here reads `/proc/<pid>/task/<tid>/children` or needs a mount namespace:
//! what happens inside the sandbox is looked at through sessions (gVisor's own `/proc`).

use super::*;

/// Why the gVisor lane cannot run here, or `None` when it can.
pub fn missing() -> Option<String> {
    if !is_root() {
        return Some("needs root: runsc do makes a sandbox only as root".into());
    }
    let Ok(out) = Command::new("runsc").arg("--version").output() else {
        return Some("runsc (gVisor) is not installed: apt-get install runsc".into());
    };
    if !out.status.success() {
        return Some("runsc --version fails".into());
    }
    let g = Gvisor::new("probe");
    if !g.output(Fs::Host, &["/bin/true"]).status.success() {
        return Some("runsc do /bin/true fails here (ptrace platform refused?)".into());
    }
    None
}

macro_rules! require_gvisor {
    () => {
        if let Some(why) = common::gvisor::missing() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}
pub(crate) use require_gvisor;

/// What the sandbox's file system is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fs {
    /// The host's file system, writable (`--force-overlay=false`): a volume the host sees,
    /// like a Kubernetes volume in a gVisor pod.
    Host,
    /// gVisor's overlay (the default of `runsc do`): the host's files read-only below a
    /// memory-backed upper layer. Directories report the overlay's device, files their
    /// layer's; nothing written is visible from the host.
    Overlay,
}

/// One sandbox's runsc state directory and every process started for it.
///
/// `runsc do` as root would put the sandbox in a fresh network namespace with a veth
/// pair even with `--network=host` (and leave both behind if killed); `--rootless`
/// keeps it in this one, so the sandbox reaches the gateway on 127.0.0.1. `do` keeps
/// its container state in a `/tmp/runsc-do*` directory of its own: [`Gvisor`] finds it
/// from the processes' command lines and removes it if `runsc do` could not.
pub struct Gvisor {
    pub state: TempDir,
    /// `runsc do` processes started here (their pids).
    started: std::sync::Mutex<Vec<i32>>,
    /// `runsc do`'s own state directories seen so far (removed at the end if left).
    do_dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl Gvisor {
    pub fn new(tag: &str) -> Gvisor {
        Gvisor {
            state: TempDir::new(&format!("runsc-{tag}")),
            started: Default::default(),
            do_dirs: Default::default(),
        }
    }

    /// `runsc … do …` up to the command.
    pub fn command(&self, fs: Fs) -> Command {
        let mut c = Command::new("runsc");
        c.arg("--root")
            .arg(&self.state.0)
            .args(["--rootless", "--network=host"]);
        if fs == Fs::Host {
            // The host changes files under the sandbox (the token, planted files): tell
            // gVisor not to cache them as its own. (It refuses this over its overlay.)
            c.arg("--file-access=shared")
                .arg("do")
                .arg("--force-overlay=false");
        } else {
            c.arg("do");
        }
        c.args(["--cwd", "/"]);
        c
    }

    /// Runs `argv` in a new sandbox and returns its output (for probes).
    pub fn output(&self, fs: Fs, argv: &[&str]) -> std::process::Output {
        let mut c = self.command(fs);
        c.args(argv).stdin(Stdio::null());
        let child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.started.lock().unwrap().push(child.id() as i32);
        child.wait_with_output().unwrap()
    }

    /// The supervisor as PID 1 of a new sandbox, with the environment's `run` arguments.
    pub fn spawn(&self, env: &Env, fs: Fs, extra: &[&str]) -> Supervisor {
        let mut args = env.run_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_args(env, fs, args)
    }

    pub fn spawn_args(&self, env: &Env, fs: Fs, args: Vec<String>) -> Supervisor {
        let log = env.dir.0.join(format!(
            "supervisor-gvisor-{:04x}.log",
            rand::random::<u16>()
        ));
        let mut cmd = self.command(fs);
        cmd.arg(BIN)
            .args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("spawn runsc do");
        self.started.lock().unwrap().push(child.id() as i32);
        Supervisor {
            child: Some(child),
            log,
            // The child is `runsc do`, not the supervisor: signal it with [`Gvisor::signal`].
            launch: Launch::Subreaper,
        }
    }

    /// Starts the supervisor in gVisor, waits for it to park, claims it.
    pub async fn bound(&self, env: &Env, fs: Fs, extra: &[&str]) -> (Supervisor, Sandbox) {
        let bound = env.claim_when_parked(self.spawn(env, fs, extra)).await;
        self.note_dirs();
        bound
    }

    /// Remembers the state directories of the running `runsc do` processes, so they are
    /// removed even if a `runsc do` is killed before it can remove its own.
    pub fn note_dirs(&self) {
        let found = do_dirs(&self.processes());
        let mut dirs = self.do_dirs.lock().unwrap();
        for d in found {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }

    /// Sends `signal` to PID 1 of the sandbox (the supervisor): `runsc do` forwards the
    /// signals it gets to the container's init.
    pub fn signal(&self, sup: &Supervisor, signal: nix::sys::signal::Signal) {
        let pid = sup.child.as_ref().expect("running").id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    }

    /// Every live process below the `runsc do` processes started here (gofer, sandbox,
    /// ptrace stubs), found by parent pid in /proc: the harness's own view, never gVisor's.
    pub fn processes(&self) -> Vec<i32> {
        let roots: Vec<i32> = self.started.lock().unwrap().clone();
        let procs = processes();
        let mut found: Vec<i32> = vec![];
        let mut frontier = roots.clone();
        for r in roots {
            if procs.iter().any(|&(p, _, st)| p as i32 == r && st != 'Z') {
                found.push(r);
            }
        }
        while let Some(p) = frontier.pop() {
            for &(pid, ppid, st) in &procs {
                if ppid as i32 == p && st != 'Z' {
                    found.push(pid as i32);
                    frontier.push(pid as i32);
                }
            }
        }
        found
    }
}

/// The `/tmp/runsc-do*` state directories named in these processes' command lines.
fn do_dirs(pids: &[i32]) -> Vec<PathBuf> {
    let mut dirs = vec![];
    for pid in pids {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        for arg in cmdline.split(|b| *b == 0) {
            let arg = String::from_utf8_lossy(arg);
            let arg = arg.strip_prefix("--root=").unwrap_or(&arg);
            if arg.starts_with("/tmp/runsc-do")
                && !dirs.iter().any(|d: &PathBuf| d == Path::new(arg))
            {
                dirs.push(PathBuf::from(arg));
            }
        }
    }
    dirs
}

impl Drop for Gvisor {
    fn drop(&mut self) {
        self.note_dirs();
        let mut left = self.processes();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !left.is_empty() {
            for pid in &left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if Instant::now() > deadline {
                eprintln!("runsc processes left: {left:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            left = self.processes();
        }
        for d in self.do_dirs.lock().unwrap().iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
