//! `sandbox-supervisor local`: the reference gateway and a supervisor on this machine,
//! through the whole lifecycle, with your terminal attached to a session in the sandbox.
//!
//! As root the supervisor runs as PID 1 of a new PID namespace (with its own /proc) and
//! the command as an unprivileged user, exactly as in a pod. Otherwise it runs as a
//! child subreaper and says so.

use anyhow::{bail, Context};
use bytes::Bytes;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::config::LocalArgs;
use crate::gateway::issuer::{LocalIssuer, PodSpec};
use crate::gateway::pki::{write_pki, ServerTls, Validity};
use crate::gateway::{ClaimOptions, ExecEvent, GatewayConfig, ReferenceGateway};
use crate::proto;

const AUDIENCE: &str = "sandbox-gateway";

pub fn main(args: LocalArgs) -> i32 {
    let _ = crate::telemetry::logs::init(crate::telemetry::logs::Format::Text, &args.log_level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandbox-supervisor local: {e:#}");
            crate::lifecycle::exit::FATAL
        }
    }
}

struct TempDir(PathBuf, bool);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("local: kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn run(args: LocalArgs) -> anyhow::Result<i32> {
    let root = std::env::temp_dir().join(format!(
        "sandbox-supervisor-local-{:08x}",
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = TempDir(root.clone(), args.keep);
    let is_root = nix::unistd::geteuid().is_root();

    let seed = match &args.seed_dir {
        Some(d) => d.clone(),
        None => demo_seed(&root.join("seed"))?,
    };
    let token_dir = root.join("token");
    let podinfo = root.join("podinfo");
    std::fs::create_dir_all(&podinfo)?;
    // In a pod the volume is a mount point the kubelet creates; here we create it.
    std::fs::create_dir_all(root.join("volume"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir_all(&token_dir)?;

    // The pod's identity, as the kubelet would project it.
    let issuer = Arc::new(LocalIssuer::generate(
        "https://kubernetes.default.svc.cluster.local",
    )?);
    let pod = PodSpec::new("local-sandbox-0");
    let _rotation = issuer.spawn_rotation(
        token_dir.clone(),
        pod.clone(),
        AUDIENCE.into(),
        Duration::from_secs(3600),
        Duration::from_secs(600),
    )?;

    let mut gw_cfg = GatewayConfig::for_tests(issuer.public_key_pem());
    let mut ca_file = None;
    if !args.plaintext {
        let (_ca, server, files) = write_pki(&root.join("pki"), &["localhost"], Validity::Current)?;
        gw_cfg.tls = Some(ServerTls {
            server,
            client_ca_pem: None,
        });
        ca_file = Some(files.ca_cert);
    }
    let gateway = ReferenceGateway::start(gw_cfg).await?;
    let endpoint = match &ca_file {
        Some(_) => format!("https://localhost:{}", gateway.local_addr().port()),
        None => gateway.endpoint(),
    };

    let user = if is_root {
        if crate::exec::lookup_user(Path::new("/etc/passwd"), "sandbox").is_some() {
            "sandbox"
        } else {
            "nobody"
        }
        .to_string()
    } else {
        nix::unistd::geteuid().as_raw().to_string()
    };
    let log_path = root.join("supervisor.log");
    let mut cmd = Command::new(std::env::current_exe().context("locating this binary")?);
    cmd.arg("run")
        .args(["--volume", &path_str(&root.join("volume"))])
        .args(["--seed-dir", &path_str(&seed)])
        .args(["--gateway", &endpoint])
        .args(["--token-path", &path_str(&token_dir.join("token"))])
        .args([
            "--pod-name",
            &pod.pod_name,
            "--pod-namespace",
            &pod.namespace,
            "--pod-uid",
            &pod.pod_uid,
        ])
        .args([
            "--annotations-path",
            &path_str(&podinfo.join("annotations")),
        ])
        .args(["--sandbox-user", &user])
        .args([
            "--listen-probes",
            "off",
            "--release-grace",
            "2s",
            "--log-format",
            "text",
            "--log-level",
            "info",
        ])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);
    match &ca_file {
        Some(ca) => {
            cmd.args(["--gateway-ca", &path_str(ca)]);
        }
        None => {
            cmd.arg("--allow-plaintext");
        }
    }
    let mut child = if is_root {
        spawn_in_pid_namespace(cmd)?
    } else {
        eprintln!("local: not root, so the supervisor runs as a child subreaper (not PID 1) and sessions run as you");
        cmd.spawn().context("starting the supervisor")?
    };

    let result = drive(&gateway, &pod.pod_name, &args.command).await;
    let (code, wiped) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("{e:#}\n--- supervisor log ---\n{log}");
        }
    };
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    if !status.success() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        eprintln!("local: the supervisor exited with {status}\n--- supervisor log ---\n{log}");
    }
    drop(tmp);
    // The supervisor exits 0 only when its release wiped the workspace; a session's own
    // status must never hide a release that did not.
    if !status.success() || !wiped {
        eprintln!("local: the release did not wipe the workspace");
        return Ok(crate::lifecycle::exit::FATAL);
    }
    Ok(code)
}

/// Claims the pod, runs the command attached to this terminal, releases. Returns the
/// session's exit status and whether the release report says the workspace was wiped.
async fn drive(
    gateway: &ReferenceGateway,
    pod_name: &str,
    command: &[String],
) -> anyhow::Result<(i32, bool)> {
    gateway
        .wait_parked(pod_name, Duration::from_secs(60))
        .await
        .context("waiting for the supervisor to park warm")?;
    let sandbox = gateway.claim(pod_name, ClaimOptions::default()).await?;
    gateway
        .wait_connected(sandbox.id(), Duration::from_secs(30))
        .await
        .context("waiting for the relay")?;

    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let argv = if command.is_empty() {
        vec!["/bin/sh".to_string()]
    } else {
        command.to_vec()
    };
    let tty = interactive.then(|| {
        let (cols, rows) = terminal_size().unwrap_or((80, 24));
        proto::Tty {
            cols: cols.into(),
            rows: rows.into(),
            term: std::env::var("TERM").unwrap_or_default(),
        }
    });
    let spec = proto::ExecSpec {
        argv,
        tty,
        stdin: true,
        ..Default::default()
    };
    let mut exec = sandbox
        .exec(spec)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let _raw = interactive.then(RawMode::enter).flatten();
    // stdin: a thread, because reading a terminal blocks.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(16);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = in_tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if in_tx
                        .blocking_send(Some(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin_open = true;
    let status = loop {
        tokio::select! {
            ev = exec.next() => match ev {
                Some(ExecEvent::Stdout(b)) => { let mut o = std::io::stdout().lock(); o.write_all(&b)?; o.flush()?; }
                Some(ExecEvent::Stderr(b)) => { let mut e = std::io::stderr().lock(); e.write_all(&b)?; e.flush()?; }
                Some(ExecEvent::Exited(s)) => break s,
                None => bail!("the session ended without an exit status"),
            },
            input = in_rx.recv(), if stdin_open => match input {
                Some(Some(data)) => { let _ = exec.write_stdin(data).await; }
                _ => { stdin_open = false; let _ = exec.close_stdin().await; }
            },
            _ = winch.recv() => {
                if let Some((c, r)) = terminal_size() { let _ = exec.resize(c.into(), r.into()).await; }
            }
        }
    };
    drop(_raw);
    let report = sandbox
        .release(
            "local session finished",
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await?;
    let wiped = report.as_ref().is_some_and(|r| r.error.is_empty());
    if let Some(r) = report {
        eprintln!(
            "local: released: {} files ({} bytes) wiped in {} ms{}",
            r.files_removed,
            r.bytes_removed,
            r.duration_ms,
            if r.error.is_empty() {
                String::new()
            } else {
                format!(", error: {}", r.error)
            }
        );
    }
    Ok((status.status, wiped))
}

/// PID 1 of a new PID namespace, with a private mount namespace and its own /proc.
fn spawn_in_pid_namespace(mut cmd: Command) -> anyhow::Result<Child> {
    use nix::mount::{mount, MsFlags};
    // SAFETY: runs in the forked child before exec; mount and unshare are plain
    // syscalls, no allocation beyond nix's small CString conversions of constants.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some("proc"),
                "/proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    // unshare(CLONE_NEWPID) applies to the calling thread's future children, so do it
    // on a thread that spawns exactly one child and then ends.
    std::thread::spawn(move || -> anyhow::Result<Child> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
            .context("creating a PID namespace")?;
        cmd.spawn()
            .context("starting the supervisor in a new PID namespace")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

fn demo_seed(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(
        dir.join("README.md"),
        "# demo workspace\nSeeded by sandbox-supervisor local.\n",
    )?;
    std::fs::write(dir.join("src/hello.txt"), "hello from the seed\n")?;
    // The supervisor copies as root into the sandbox user's workspace; make sure it
    // can traverse a temp dir whatever this process's umask was.
    use std::os::unix::fs::PermissionsExt;
    for p in [dir, &dir.join("src")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(dir.to_path_buf())
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The local terminal in raw mode (keys go straight to the sandbox's PTY); restored on drop.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}
