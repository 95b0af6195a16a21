//! `sandbox-supervisor local`: the reference gateway and a supervisor on this machine,
//! through the whole lifecycle, with your terminal attached to a session in the sandbox.
//!
//! As root the supervisor runs as PID 1 of a new PID namespace (with its own /proc) and
//! the command as an unprivileged user, exactly as in a pod. Otherwise (not root, or a
//! kernel without PID or mount namespaces, like gVisor) it runs as a child subreaper and
//! says so. The two live and die together: the supervisor gets `PR_SET_PDEATHSIG`, and
//! `local` stops waiting the moment its supervisor exits, with the supervisor's reason.

mod spawn;
mod transfer;

use anyhow::{bail, Context};
use bytes::Bytes;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
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
    let program = std::env::current_exe().context("locating this binary")?;
    let mut sup_args: Vec<String> = vec!["run".into()];
    let mut arg = |a: &str| sup_args.push(a.to_owned());
    for a in [
        "--volume",
        &path_str(&root.join("volume")),
        "--seed-dir",
        &path_str(&seed),
        "--gateway",
        &endpoint,
        "--token-path",
        &path_str(&token_dir.join("token")),
        "--pod-name",
        &pod.pod_name,
        "--pod-namespace",
        &pod.namespace,
        "--pod-uid",
        &pod.pod_uid,
        "--annotations-path",
        &path_str(&podinfo.join("annotations")),
        "--sandbox-user",
        &user,
        "--listen-probes",
        "off",
        "--release-grace",
        "2s",
        "--log-format",
        "text",
        "--log-level",
        "info",
    ] {
        arg(a);
    }
    match &ca_file {
        Some(ca) => {
            arg("--gateway-ca");
            arg(&path_str(ca));
        }
        None => arg("--allow-plaintext"),
    }
    let path_var = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    // On this (the main) thread: the supervisor's death signal is tied to it.
    let (child, mode) = spawn::spawn(
        &program,
        &sup_args,
        &path_var,
        std::fs::File::create(&log_path)?,
        is_root,
    )?;
    match &mode {
        spawn::Mode::Pid1 => {}
        spawn::Mode::Subreaper(why) => {
            let who = if is_root { "the sandbox user" } else { "you" };
            eprintln!("local: {why}, so the supervisor runs as a child subreaper (not PID 1) and sessions run as {who}");
        }
    }
    let pid = child.pid;
    let mut exited = tokio::task::spawn_blocking(move || spawn::Supervisor::wait(pid));

    // The session against the supervisor's exit: a supervisor that dies (refuses, fails,
    // is killed) never parks or serves, so waiting on the gateway would only time out.
    let driving = drive(&gateway, &pod.pod_name, &args);
    tokio::pin!(driving);
    let first = tokio::select! {
        r = &mut driving => First::Drove(r),
        status = &mut exited => First::Exited(status??),
    };
    let result = match first {
        First::Drove(r) => r,
        First::Exited(status) => {
            // Exiting 0 right after a release can beat the report to `drive`: let it land.
            let late = if status.success() {
                tokio::time::timeout(Duration::from_secs(5), &mut driving)
                    .await
                    .ok()
            } else {
                None
            };
            match late {
                Some(r) => return finish(r, status, &log_path, tmp),
                None => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    eprintln!(
                        "local: the supervisor exited ({status}) before the session finished:\n{}",
                        spawn::reason_from_log(&log)
                    );
                    eprintln!("--- supervisor log ---\n{log}");
                    drop(tmp);
                    return Ok(match status {
                        spawn::Ended::Code(c) if c != 0 => c,
                        _ => crate::lifecycle::exit::FATAL,
                    });
                }
            }
        }
    };
    if result.is_err() {
        child.signal(nix::sys::signal::Signal::SIGTERM);
    }
    let status = exited.await??;
    finish(result, status, &log_path, tmp)
}

/// What ended first: the session (and release), or the supervisor.
enum First {
    Drove(anyhow::Result<(i32, bool)>),
    Exited(spawn::Ended),
}

/// The end of a run whose session finished: `local`'s exit code.
fn finish(
    result: anyhow::Result<(i32, bool)>,
    status: spawn::Ended,
    log_path: &Path,
    tmp: TempDir,
) -> anyhow::Result<i32> {
    let (code, wiped) = match result {
        Ok(v) => v,
        Err(e) => {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            bail!("{e:#}\n--- supervisor log ---\n{log}");
        }
    };
    if !status.success() {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
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
    args: &LocalArgs,
) -> anyhow::Result<(i32, bool)> {
    let (command, forwards) = (&args.command, &args.forward);
    gateway
        .wait_parked(pod_name, Duration::from_secs(60))
        .await
        .context("waiting for the supervisor to park warm")?;
    let sandbox = gateway.claim(pod_name, ClaimOptions::default()).await?;
    gateway
        .wait_connected(sandbox.id(), Duration::from_secs(30))
        .await
        .context("waiting for the relay")?;
    // --- local --forward: each a loopback listener here, relayed into the sandbox ---
    let mut serving = Vec::new();
    for f in forwards {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", f.local))
            .await
            .with_context(|| {
                format!(
                    "--forward {}:{}: cannot listen on 127.0.0.1:{}",
                    f.port, f.local, f.local
                )
            })?;
        eprintln!(
            "local: forwarding 127.0.0.1:{} -> port {} in the sandbox",
            f.local, f.port
        );
        let sb = sandbox.clone();
        let port = u32::from(f.port);
        serving.push(tokio::spawn(async move {
            sb.serve_forward(listener, String::new(), port).await
        }));
    }
    let _stop_serving = AbortOnDrop(serving);
    // --- end local --forward ---
    for t in &args.upload {
        transfer::upload(&sandbox, t).await?;
    }

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
    // Downloads run whatever the command's status, before the release wipes.
    let mut download_failed = None;
    for t in &args.download {
        if let Err(e) = transfer::download(&sandbox, t).await {
            eprintln!("local: {e:#}");
            download_failed = Some(e);
        }
    }
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
    if let Some(e) = download_failed {
        return Err(e.context("a download failed (the sandbox was released anyway)"));
    }
    Ok((status.status, wiped))
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

/// Stops the `--forward` listeners when the command is done.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<std::io::Result<()>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
