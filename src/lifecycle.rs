//! The lifecycle state machine, top to bottom:
//!
//! ```text
//! boot ─▶ seeding ─▶ warm ─(claim)─▶ binding ─▶ bound ─(release)─▶ releasing ─▶ released (exit 0)
//!   │                  │                                                   
//!   └──────────────────┴──▶ refused (tombstone, foreign binding, tampered state: exit 65)
//! ```
//!
//! Every transition is logged as `lifecycle.transition` with from/to/reason. The only
//! durable state is in the workspace volume's records (written by `workspace`): the
//! seed record, the binding record (durable before any session), and the tombstone.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::RunConfig;
use crate::exec::{ExecConfig, ExecPolicy, Sessions};
use crate::identity::{
    ClaimOutcome, Exchange, PodFacts, ProjectedToken, SandboxCredentials, SecretToken,
};
use crate::pid1::{self, Reaper, SignalIntake};
use crate::proto;
use crate::relay::channel::GatewayChannel;
use crate::relay::{self, GatewayEndpoint, Relay, RelayEnd};
use crate::telemetry::{logs, Telemetry};
use crate::workspace::{self, BootState, Owner, Volume, VolumeConfig};

mod retire;
mod start;
use retire::{retire, tombstone_and_wipe};
pub use start::run_command;
use start::seed_source;

/// Documented exit codes (README "Exit codes").
pub mod exit {
    /// Released: the workload was killed, the workspace wiped.
    pub const RELEASED: i32 = 0;
    /// A flag or variable is invalid (EX_USAGE).
    pub const CONFIG: i32 = 64;
    /// Refused to run: tombstone, foreign binding, tampered or corrupt records.
    pub const REFUSED: i32 = 65;
    /// Anything else that stopped the supervisor (EX_SOFTWARE).
    pub const FATAL: i32 = 70;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Boot,
    Seeding,
    Warm,
    Binding,
    Bound,
    Releasing,
    Released,
    Refused,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Boot => "boot",
            State::Seeding => "seeding",
            State::Warm => "warm",
            State::Binding => "binding",
            State::Bound => "bound",
            State::Releasing => "releasing",
            State::Released => "released",
            State::Refused => "refused",
        }
    }
}

/// Why the workload is being released.
#[derive(Debug)]
enum ReleaseCause {
    Gateway {
        reason: String,
        grace: Option<Duration>,
        reporter: Box<relay::Reporter>,
    },
    Signal(i32),
    ClaimGone(String),
}

struct Machine {
    cfg: RunConfig,
    state: State,
    telemetry: Arc<Telemetry>,
    reaper: Reaper,
    signals: SignalIntake,
    instance_id: String,
    pod: PodFacts,
}

impl Machine {
    fn transition(&mut self, to: State, reason: &str) {
        tracing::info!(
            event = "lifecycle.transition",
            from = self.state.as_str(),
            to = to.as_str(),
            reason,
            "{} -> {}",
            self.state.as_str(),
            to.as_str()
        );
        self.state = to;
        self.telemetry.set_state(to.as_str());
        if matches!(
            to,
            State::Seeding | State::Binding | State::Releasing | State::Released | State::Refused
        ) {
            self.telemetry.set_ready(false);
        }
        if to == State::Bound {
            self.telemetry.set_ready(true);
        }
    }

    fn refuse(&mut self, reason: &str, detail: &str) -> i32 {
        tracing::error!(
            event = "reuse.refused",
            reason,
            detail,
            "refusing to run: {detail}"
        );
        self.transition(State::Refused, reason);
        exit::REFUSED
    }
}

/// Runs the supervisor until it is released (or refuses). Returns the exit code.
pub async fn run(
    cfg: RunConfig,
    reaper: Reaper,
    signals: SignalIntake,
    telemetry: Arc<Telemetry>,
) -> i32 {
    let pod = PodFacts {
        namespace: cfg.pod_namespace.clone(),
        name: cfg.pod_name.clone(),
        uid: cfg.pod_uid.clone(),
    };
    let instance_id = random_id();
    logs::set_context("instance_id", instance_id.clone());
    if !pod.uid.is_empty() {
        logs::set_context("pod_uid", pod.uid.clone());
    }
    let mut m = Machine {
        cfg,
        state: State::Boot,
        telemetry,
        reaper,
        signals,
        instance_id,
        pod,
    };
    m.telemetry.set_state("boot");
    tracing::info!(
        event = "supervisor.started",
        version = crate::config::VERSION,
        mode = m.reaper.mode().as_str(),
        pid = std::process::id(),
        "sandbox-supervisor starting"
    );

    // ── boot: the volume, its records, and what this boot may do ────────────────────
    let privileged = nix::unistd::geteuid().is_root();
    let sandbox_user = match crate::exec::try_lookup_user(&m.cfg.passwd, &m.cfg.sandbox_user) {
        Ok(Some(u)) => u,
        Ok(None) => {
            tracing::error!(event = "config.invalid", option = "sandbox-user", value = %m.cfg.sandbox_user, "--sandbox-user {:?} is not in {}: add the user to the image", m.cfg.sandbox_user, m.cfg.passwd.display());
            return exit::CONFIG;
        }
        Err(e) => {
            tracing::error!(event = "config.invalid", option = "passwd", error = %e, "--passwd: {e}");
            return exit::CONFIG;
        }
    };
    // Every session without an explicit user runs as the sandbox user: if that is root,
    // refusing an explicit `user: root` would protect nothing.
    if sandbox_user.is_root() && !m.cfg.allow_root_sessions {
        tracing::error!(event = "config.invalid", option = "sandbox-user", value = %m.cfg.sandbox_user, uid = sandbox_user.uid, gid = sandbox_user.gid, "--sandbox-user {:?} is uid {} gid {}: sessions would run as root (or root's group); use an unprivileged user, or set --allow-root-sessions to permit it", m.cfg.sandbox_user, sandbox_user.uid, sandbox_user.gid);
        return exit::CONFIG;
    }
    let owner = if privileged {
        Owner {
            uid: sandbox_user.uid,
            gid: sandbox_user.gid,
        }
    } else {
        own_ids()
    };
    let volume_cfg = VolumeConfig {
        root: m.cfg.volume.clone(),
        owner,
        privileged,
    };
    let volume = match Volume::open(&volume_cfg) {
        // The workspace logs each guarantee it cannot give (workspace.guarantee_missing).
        Ok((mut v, _caveats)) => {
            // Recorded in the seed record, so a record written for another pod shows.
            v.set_pod_uid(non_empty(&m.pod.uid).map(str::to_owned));
            Arc::new(v)
        }
        // A damaged `.supervisor/` is tampering, not a layout problem of the template.
        Err(e) => {
            let r = e.into_refusal();
            return m.refuse(r.reason.as_str(), &r.to_string());
        }
    };
    let boot = match volume.boot_state(non_empty(&m.pod.uid)) {
        Ok(b) => b,
        Err(refusal) => return m.refuse(refusal.reason.as_str(), &refusal.to_string()),
    };
    let (seed_record, resume) = match boot {
        BootState::ReleasedNotWiped(_) => {
            // A crash between the tombstone and the end of the wipe: finish the wipe,
            // then refuse — this pod already served a tenant.
            m.transition(State::Releasing, "finishing an interrupted wipe");
            retire(&volume, &m.telemetry, &m.pod.uid).await;
            return m.refuse(
                "tombstone",
                "this pod was released before; its interrupted wipe has now been finished",
            );
        }
        BootState::Fresh => (None, None),
        BootState::Seeded(seed) => (Some(seed), None),
        BootState::Bound { seed, binding } => (seed, Some(binding)),
    };

    // ── seeding: once, before any tenant exists ──────────────────────────────────────
    let seed_record = match seed_record {
        Some(s) => {
            tracing::info!(event = "seed.skipped", digest = %s.digest, "workspace already seeded");
            s
        }
        None => {
            m.transition(State::Seeding, "no seed record");
            let started = Instant::now();
            // A SIGTERM while seeding (a slow or stalled seed) stops it: no tenant exists
            // yet, so nothing is wiped; the half-built staging directory is discarded
            // (or, if that is cut short, by the next boot) and we exit as released.
            let mut stopped_by = None;
            let signals = &mut m.signals;
            let stop = async {
                match signals.recv().await {
                    Some(sig) => stopped_by = Some(sig.signal),
                    // No signal thread: nothing can stop us this way.
                    None => std::future::pending().await,
                }
            };
            let seeded = volume.seed_until(&seed_source(&m.cfg), stop).await;
            if let Some(sig) = stopped_by {
                if let Err(e) = &seeded {
                    tracing::info!(event = "seed.stopped", signal = sig, error = %e, "seeding stopped by a signal");
                }
                m.transition(State::Released, &format!("signal {sig} while seeding"));
                return exit::RELEASED;
            }
            match seeded {
                Ok(s) => {
                    m.telemetry
                        .metrics
                        .seed_duration_seconds
                        .set(started.elapsed().as_secs_f64());
                    s
                }
                Err(e) => {
                    tracing::error!(event = "seed.failed", error = %e, "seeding failed");
                    return exit::FATAL;
                }
            }
        }
    };

    // ── warm: parked at the gateway, holding no tenant identity ─────────────────────
    let endpoint = GatewayEndpoint::new(
        m.cfg.gateway.clone(),
        m.cfg.gateway_ca.clone(),
        m.cfg.gateway_server_name.clone(),
        m.cfg.client_cert.clone(),
        m.cfg.client_key.clone(),
    );
    let channel = match GatewayChannel::new(endpoint.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(event = "config.invalid", option = "gateway", error = %e, "{e}");
            return exit::CONFIG;
        }
    };
    let exchange = Exchange {
        channel: channel.clone(),
        projected: ProjectedToken::new(&m.cfg.token_path)
            .with_audience(Some(m.cfg.audience.clone())),
        pod: m.pod.clone(),
        instance_id: m.instance_id.clone(),
        seed: Some(proto::SeedInfo {
            digest: seed_record.digest.clone(),
            files: seed_record.files,
            bytes: seed_record.bytes,
        }),
        hint_path: m.cfg.annotations_path.clone(),
        hint_key: m.cfg.claim_annotation.clone(),
        telemetry: m.telemetry.clone(),
    };
    let resume_proto = resume.as_ref().map(binding_to_proto);
    m.transition(
        State::Warm,
        if resume.is_some() {
            "resuming a binding after restart"
        } else {
            "seeded"
        },
    );
    let activation = tokio::select! {
        outcome = exchange.await_claim(resume_proto.clone()) => match outcome {
            ClaimOutcome::Activated(a) => a,
            ClaimOutcome::Conflict(why) => {
                if resume.is_some() {
                    // Crashed while bound and another claim answered: the tenant's
                    // files are still here. Retire them before refusing.
                    retire(&volume, &m.telemetry, &m.pod.uid).await;
                }
                return m.refuse("claim_conflict", &why);
            }
            ClaimOutcome::GatewayRefused(why) => {
                if resume.is_some() {
                    // Crashed while bound and the claim is gone: retire the files first.
                    retire(&volume, &m.telemetry, &m.pod.uid).await;
                }
                return m.refuse("gateway_refused", &why);
            }
        },
        sig = m.signals.recv() => {
            let reason = format!("signal {} while warm", sig.map(|s| s.signal).unwrap_or(0));
            if resume.is_some() {
                // Crashed while bound and terminated before the binding resumed: the
                // tenant's files are still here. Retire them (kill, tombstone, wipe) before
                // saying released; exit 0 always means the workspace was wiped.
                m.transition(State::Releasing, &reason);
                let (killed, all_gone) = pid1::kill_workload(&m.reaper, m.cfg.release_grace).await;
                tracing::info!(event = "release.killed", processes = killed, all_gone, "workload stopped");
                if !retire(&volume, &m.telemetry, &m.pod.uid).await {
                    tracing::error!(event = "release.failed", reason = %reason, "terminated while resuming a binding and the workspace could not be wiped");
                    return exit::FATAL;
                }
            }
            // Otherwise no tenant ever ran: nothing to wipe.
            m.transition(State::Released, &reason);
            return exit::RELEASED;
        }
    };
    let activated_at = Instant::now();

    // ── binding: durable record first, then the relay ───────────────────────────────
    m.transition(State::Binding, "activation received");
    let binding = workspace::BindingRecord {
        sandbox_id: activation.sandbox_id.clone(),
        claim_uid: activation.claim_uid.clone(),
        pod_uid: activation.pod_uid.clone(),
        instance_id: resume
            .as_ref()
            .map(|r| r.instance_id.clone())
            .unwrap_or_else(|| m.instance_id.clone()),
        bound_at_ms: resume
            .as_ref()
            .map(|r| r.bound_at_ms)
            .unwrap_or_else(now_ms),
    };
    logs::set_context("sandbox_id", binding.sandbox_id.clone());
    logs::set_context("claim_uid", binding.claim_uid.clone());
    logs::set_context("pod_uid", binding.pod_uid.clone());
    // The record is written (fsync'd) while the relay's Connect is in flight: binding
    // costs the longer of the two, not their sum. The relay takes no session before
    // `binding_durable` is true. A resumed binding is already on disk.
    let (binding_durable, durable_rx) = tokio::sync::watch::channel(resume.is_some());
    let mut binding_write = resume.is_none().then(|| {
        let (volume, record) = (volume.clone(), binding.clone());
        tokio::task::spawn_blocking(move || volume.write_binding(&record))
    });
    let token = SecretToken::new(activation.token.clone());
    let bound_event = |token: &SecretToken| {
        tracing::info!(event = "identity.bound", token = %token, expires_in_ms = crate::identity::lifetime_from(activation.token_expires_at_ms).as_millis() as u64, resumed = resume.is_some(), "bound to claim");
    };
    if resume.is_some() {
        bound_event(&token);
    }
    let creds = SandboxCredentials::new(token.clone(), activation.token_expires_at_ms);

    let policy = ExecPolicy {
        workspace: volume.workspace_dir(),
        default_user: if privileged {
            sandbox_user
        } else {
            crate::exec::lookup_user(&m.cfg.passwd, &own_ids().uid.to_string())
                .unwrap_or(sandbox_user)
        },
        allow_root: m.cfg.allow_root_sessions,
        privileged,
        passwd: m.cfg.passwd.clone(),
    };
    let policy_user = policy.default_user.clone();
    let exec_cfg = ExecConfig {
        policy,
        buffer_capacity: m.cfg.session_buffer,
        max_sessions: m.cfg.max_sessions as usize,
        drain_timeout: m.cfg.drain_timeout,
        default_kill_grace: m.cfg.kill_grace,
        output_budget: m.cfg.output_budget,
        spawn_timeout: m.cfg.spawn_timeout,
        hardening: crate::exec::spawn::Hardening {
            max_processes: pid1::workload_process_cap(m.cfg.max_workload_processes),
            oom_score_adj: Some(m.cfg.session_oom_score_adj),
        },
    };
    let (sessions, session_events) = match Sessions::new(exec_cfg, m.reaper.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = "exec.spawner_failed", error = %e, "cannot start the session spawner thread");
            return exit::FATAL;
        }
    };
    let hello = proto::Hello {
        sandbox_id: binding.sandbox_id.clone(),
        claim_uid: binding.claim_uid.clone(),
        instance_id: m.instance_id.clone(),
        sessions: vec![],
    };
    let files = crate::files::Files::new(
        crate::files::FilesConfig {
            workspace: volume.workspace_dir(),
            roots: m.cfg.file_roots.clone(),
            identity: privileged.then_some((policy_user.uid, policy_user.gid)),
            resume_window: m.cfg.file_resume_window,
            max_file_size: m.cfg.max_file_size,
            max_operations: m.cfg.max_file_operations as usize,
        },
        m.telemetry.clone(),
    );
    let forwards = crate::ports::Forwards::new(crate::ports::ForwardConfig::from_run(&m.cfg));
    let relay = Relay {
        endpoint: endpoint.clone(),
        channel: Some(channel.get()),
        creds: creds.clone(),
        sessions: sessions.clone(),
        files: files.clone(),
        forwards: forwards.clone(),
        telemetry: m.telemetry.clone(),
        hello: hello.clone(),
        binding_durable: durable_rx,
    };
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let relay_task = tokio::spawn(relay.run(session_events, accepted_tx));
    let refresh = exchange.refresh_until_gone(creds.clone(), binding_to_proto(&binding));
    tokio::pin!(refresh, relay_task);

    // ── bound: serving sessions until released ───────────────────────────────────────
    let mut accepted_rx = Some(accepted_rx);
    let cause = loop {
        tokio::select! {
            written = async { binding_write.as_mut().expect("guarded").await }, if binding_write.is_some() => {
                binding_write = None;
                match written {
                    Ok(Ok(())) => {
                        bound_event(&token);
                        binding_durable.send_replace(true);
                    }
                    Ok(Err(e)) => {
                        tracing::error!(event = "identity.bind_failed", error = %e, "cannot write the binding record; refusing to serve without it");
                        return exit::FATAL;
                    }
                    Err(e) => {
                        tracing::error!(event = "identity.bind_failed", error = %e, "the binding record write did not finish; refusing to serve without it");
                        return exit::FATAL;
                    }
                }
            }
            ok = async { accepted_rx.as_mut().expect("guarded").await }, if accepted_rx.is_some() => {
                accepted_rx = None;
                if ok.is_ok() {
                    m.telemetry.metrics.observe_bind(activated_at.elapsed());
                    tracing::info!(event = "identity.relay_accepted", bind_us = activated_at.elapsed().as_micros() as u64, "relay accepted; serving sessions");
                    m.transition(State::Bound, "relay accepted");
                    // Off the claim's critical path, before any workload is running.
                    files.start_workers();
                }
            }
            end = &mut relay_task => break match end {
                Ok(RelayEnd::Release { reason, grace, reporter }) => ReleaseCause::Gateway { reason, grace, reporter },
                Ok(RelayEnd::ClaimGone(why)) => ReleaseCause::ClaimGone(why),
                Err(e) => ReleaseCause::ClaimGone(format!("relay task failed: {e}")),
            },
            why = &mut refresh => break ReleaseCause::ClaimGone(why),
            sig = m.signals.recv() => break ReleaseCause::Signal(sig.map(|s| s.signal).unwrap_or(libc::SIGTERM)),
        }
    };

    // ── releasing: stop, kill, tombstone, wipe, report ──────────────────────────────
    // A release that came while the binding record was still being written waits for
    // it: the tombstone is written after it, never beside it.
    if let Some(write) = binding_write.take() {
        let _ = write.await;
    }
    let (reason, grace, reporter) = match cause {
        ReleaseCause::Gateway {
            reason,
            grace,
            reporter,
        } => (format!("gateway: {reason}"), grace, Some(reporter)),
        ReleaseCause::Signal(s) => (format!("signal {s}"), None, None),
        ReleaseCause::ClaimGone(why) => (why, None, None),
    };
    m.transition(State::Releasing, &reason);
    let started = Instant::now();
    sessions.stop_accepting();
    // Transfers and forwards end before the workload dies: no write lands half-done
    // in a workspace about to be wiped, no forward outlives the server it reached.
    files.abort_all().await;
    forwards.close_all().await;
    let grace = grace.unwrap_or(m.cfg.release_grace);
    let (killed, all_gone) = pid1::kill_workload(&m.reaper, grace).await;
    tracing::info!(
        event = "release.killed",
        processes = killed,
        all_gone,
        "workload stopped"
    );
    let mut report = tombstone_and_wipe(&volume, &m.telemetry, non_empty(&binding.pod_uid)).await;
    report.processes_killed = killed;
    report.duration_ms = started.elapsed().as_millis() as u64;
    let delivered = match reporter {
        Some(r) => r.send(report.clone()).await,
        None => relay::report_fresh(&endpoint, &creds, hello, report.clone()).await,
    };
    tracing::info!(event = "release.reported", delivered, files = report.files_removed, bytes = report.bytes_removed, error = %report.error, "release report");
    if !report.error.is_empty() {
        // Not `released`: that word (and exit 0) means the workspace was wiped.
        tracing::error!(event = "release.failed", error = %report.error, "the release did not finish wiping the workspace");
        return exit::FATAL;
    }
    m.transition(State::Released, &reason);
    exit::RELEASED
}

fn binding_to_proto(b: &workspace::BindingRecord) -> proto::BindingRecord {
    proto::BindingRecord {
        sandbox_id: b.sandbox_id.clone(),
        claim_uid: b.claim_uid.clone(),
        pod_uid: b.pod_uid.clone(),
        instance_id: b.instance_id.clone(),
        bound_at_ms: b.bound_at_ms,
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn own_ids() -> Owner {
    Owner {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
