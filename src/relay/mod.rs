//! The outbound relay: the control stream (`Connect`), session streams, heartbeats,
//! reconnect with backoff, and the release report.
//!
//! Sessions live in [`crate::exec::Sessions`], not here: a dropped relay never touches
//! a process. After a reconnect, `Hello` lists every session and the gateway
//! re-attaches the ones it wants from the offsets it holds.

pub mod channel;
mod opener;
mod stream;

pub use channel::{authed, ChannelError, GatewayEndpoint};
pub use opener::Opener;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::exec::Sessions;
use crate::identity::{Backoff, SandboxCredentials};
use crate::proto::{self, gateway_message, supervisor_message, SupervisorMessage};
use crate::telemetry::{SessionOutcome, Telemetry};

/// Longest wait for `Connect` to be answered with `Accepted`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait to queue a session event from the message handler.
const EVENT_SEND_LIMIT: Duration = Duration::from_secs(5);

/// Queues a frame on the control stream. A queue that stays full means the connection
/// stopped moving (half-open): report it rather than wait, so liveness checks still run.
async fn send_bounded(
    tx: &mpsc::Sender<SupervisorMessage>,
    msg: SupervisorMessage,
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, tx.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("control stream closed".into()),
        Err(_) => Err(format!(
            "control stream stalled: nothing could be sent for {limit:?}"
        )),
    }
}

/// Why the relay stopped serving.
#[derive(Debug)]
pub enum RelayEnd {
    /// The gateway sent `Release`. The control stream stays open for the report.
    Release {
        reason: String,
        grace: Option<Duration>,
        reporter: Box<Reporter>,
    },
    /// The gateway refused us on connect (`PERMISSION_DENIED`/`NOT_FOUND`): the claim
    /// is gone.
    ClaimGone(String),
}

/// Sends the `ReleaseReport` on the control stream that carried the `Release`.
/// Until then the stream stays served: heartbeats go on (the kill grace and the wipe
/// may outlast three intervals) and every `OpenSession`/`AttachSession` is answered
/// `failed{UNAVAILABLE}` rather than left unanswered.
#[derive(Debug)]
pub struct Reporter {
    tx: mpsc::Sender<SupervisorMessage>,
    /// Owns the response side, which stays open until the report went out.
    releasing: tokio::task::JoinHandle<()>,
}

/// What a session request gets once the release has begun.
pub const RELEASING: &str = "the sandbox is releasing: no new sessions or streams";

impl Reporter {
    fn new(
        tx: mpsc::Sender<SupervisorMessage>,
        down: tonic::Streaming<proto::GatewayMessage>,
        heartbeat: Duration,
    ) -> Self {
        let releasing = tokio::spawn(serve_releasing(tx.clone(), down, heartbeat));
        Reporter { tx, releasing }
    }

    pub async fn send(self, report: proto::ReleaseReport) -> bool {
        let msg = SupervisorMessage {
            msg: Some(supervisor_message::Msg::ReleaseReport(report)),
        };
        let sent = self.tx.send(msg).await.is_ok();
        // Give HTTP/2 a moment to flush before the stream is dropped.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sent
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.releasing.abort();
    }
}

/// Serves the control stream between `Release` and the report.
async fn serve_releasing(
    tx: mpsc::Sender<SupervisorMessage>,
    mut down: tonic::Streaming<proto::GatewayMessage>,
    heartbeat: Duration,
) {
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reading = true;
    loop {
        let session_id = tokio::select! {
            msg = down.message(), if reading => match msg {
                Ok(Some(proto::GatewayMessage { msg: Some(gateway_message::Msg::OpenSession(o)) })) => o.session_id,
                Ok(Some(proto::GatewayMessage { msg: Some(gateway_message::Msg::AttachSession(a)) })) => a.session_id,
                Ok(Some(proto::GatewayMessage { msg: Some(gateway_message::Msg::OpenFile(o)) })) => {
                    refuse_releasing(&tx, o.transfer_id).await;
                    continue;
                }
                Ok(Some(proto::GatewayMessage { msg: Some(gateway_message::Msg::OpenForward(o)) })) => {
                    refuse_releasing(&tx, o.forward_id).await;
                    continue;
                }
                Ok(Some(_)) => continue,
                // The report may still go out on the up side.
                Ok(None) | Err(_) => { reading = false; continue; }
            },
            _ = tick.tick() => {
                let hb = SupervisorMessage { msg: Some(supervisor_message::Msg::Heartbeat(proto::Heartbeat {})) };
                let _ = tx.try_send(hb);
                continue;
            }
        };
        tracing::info!(event = "session.failed", session_id = %session_id, code = ?proto::ErrorCode::Unavailable, error = RELEASING, "session request during the release refused");
        let ev = proto::SessionEvent {
            session_id,
            event: Some(proto::session_event::Event::Failed(proto::Error {
                code: proto::ErrorCode::Unavailable as i32,
                message: RELEASING.into(),
            })),
        };
        let msg = SupervisorMessage {
            msg: Some(supervisor_message::Msg::SessionEvent(ev)),
        };
        if send_bounded(&tx, msg, EVENT_SEND_LIMIT).await.is_err() {
            return;
        }
    }
}

/// A file or forward request during the release gets `ChannelFailed{UNAVAILABLE}`.
async fn refuse_releasing(tx: &mpsc::Sender<SupervisorMessage>, id: String) {
    tracing::info!(event = "channel.refused", id = %id, code = ?proto::ErrorCode::Unavailable, error = RELEASING, "file or forward request during the release refused");
    let msg = opener::channel_failed(&id, proto::ErrorCode::Unavailable, RELEASING.into());
    let _ = send_bounded(tx, msg, EVENT_SEND_LIMIT).await;
}

pub struct Relay {
    pub endpoint: GatewayEndpoint,
    /// The channel used while warm, reused so binding needs no new TLS handshake.
    pub channel: Option<Channel>,
    pub creds: SandboxCredentials,
    pub sessions: Sessions,
    pub files: crate::files::Files,
    pub forwards: crate::ports::Forwards,
    pub telemetry: Arc<Telemetry>,
    pub hello: proto::Hello,
    /// True once the binding record is durable. `Connect` goes out while it is being
    /// written; no gateway message (no session) is taken before it is.
    pub binding_durable: tokio::sync::watch::Receiver<bool>,
}

enum Attempt {
    End(RelayEnd),
    /// The connection dropped (after it was accepted, if `was_accepted`).
    Dropped {
        was_accepted: bool,
        why: String,
        /// The gateway sent a control frame past the message limit.
        oversized: bool,
    },
}

impl Relay {
    /// Serves until released. `on_accepted` fires after the first `Accepted`.
    pub async fn run(
        self,
        mut events: mpsc::UnboundedReceiver<proto::SessionEvent>,
        on_accepted: tokio::sync::oneshot::Sender<()>,
    ) -> RelayEnd {
        let mut on_accepted = Some(on_accepted);
        let mut backoff = Backoff::default();
        let mut ever_accepted = false;
        let mut last_oversized = false;
        let mut channel = self.channel.clone();
        loop {
            // The warm channel is used once; after a drop a fresh one is built, since
            // the old connection may be half-open and the CA bundle may have rotated.
            let ch = match channel.take() {
                Some(ch) => ch,
                None => match self.endpoint.channel() {
                    Ok(ch) => ch,
                    Err(e) => {
                        tracing::error!(event = "relay.channel_failed", error = %e, "cannot set up the gateway connection");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            match self
                .attempt(ch, &mut events, &mut on_accepted, ever_accepted)
                .await
            {
                Attempt::End(end) => return end,
                Attempt::Dropped {
                    was_accepted,
                    why,
                    oversized,
                } => {
                    if was_accepted {
                        ever_accepted = true;
                        // A gateway that sends its oversized frame again on every new
                        // stream must not make us reconnect in a tight loop: after the
                        // first such drop, the backoff keeps growing.
                        if !(oversized && last_oversized) {
                            backoff.reset();
                        }
                    }
                    last_oversized = oversized;
                    let delay = backoff.next_delay();
                    tracing::warn!(event = "relay.disconnected", reason = %why, retry_in_ms = delay.as_millis() as u64, "relay dropped; reconnecting");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt(
        &self,
        channel: Channel,
        events: &mut mpsc::UnboundedReceiver<proto::SessionEvent>,
        on_accepted: &mut Option<tokio::sync::oneshot::Sender<()>>,
        reconnect: bool,
    ) -> Attempt {
        let dropped = |why: String, was_accepted: bool| Attempt::Dropped {
            was_accepted,
            why,
            oversized: false,
        };
        let (tx, rx) = mpsc::channel::<SupervisorMessage>(256);
        let mut hello = self.hello.clone();
        hello.sessions = self.sessions.states();
        let listed = hello.sessions.len();
        let _ = tx
            .send(SupervisorMessage {
                msg: Some(supervisor_message::Msg::Hello(hello)),
            })
            .await;
        let req = match authed(ReceiverStream::new(rx), &self.creds.token()) {
            Ok(r) => r,
            Err(e) => return dropped(e.to_string(), false),
        };
        // Bounded: a connection that opens but never answers (a blackholed peer, a
        // stuck proxy) must not hold the relay forever.
        let mut down = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            channel::client(channel.clone()).connect(req),
        )
        .await
        {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => return self.classify(status, false),
            Err(_) => {
                return dropped(
                    format!("no answer to Connect within {CONNECT_TIMEOUT:?}"),
                    false,
                )
            }
        };
        let first = match tokio::time::timeout(CONNECT_TIMEOUT, down.message()).await {
            Ok(first) => first,
            Err(_) => {
                return dropped(
                    format!("no Accepted within {CONNECT_TIMEOUT:?} of Connect"),
                    false,
                )
            }
        };
        let heartbeat = match first {
            Ok(Some(proto::GatewayMessage {
                msg: Some(gateway_message::Msg::Accepted(a)),
            })) => Duration::from_millis(u64::from(a.heartbeat_interval_ms.max(100))),
            Ok(Some(other)) => {
                return dropped(format!("expected Accepted first, got {other:?}"), false)
            }
            Ok(None) => {
                return dropped(
                    "gateway closed the control stream before Accepted".into(),
                    false,
                )
            }
            Err(status) => return self.lost_down(status, false),
        };
        // DESIGN §3: the binding is durable before the relay accepts any session.
        // Frames the gateway sends meanwhile wait in the stream.
        let mut durable = self.binding_durable.clone();
        if durable.wait_for(|d| *d).await.is_err() {
            // The write failed; the lifecycle refuses to serve and exits.
            std::future::pending::<()>().await;
        }
        if reconnect {
            self.telemetry.metrics.relay_reconnects_total.inc();
            tracing::info!(
                event = "relay.reconnected",
                sessions = listed,
                "relay reconnected"
            );
        } else {
            tracing::info!(
                event = "relay.connected",
                heartbeat_ms = heartbeat.as_millis() as u64,
                "relay accepted"
            );
        }
        if let Some(tx) = on_accepted.take() {
            let _ = tx.send(());
        }

        let mut last_heard = Instant::now();
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = down.message() => {
                    last_heard = Instant::now();
                    match msg {
                        Ok(Some(m)) => {
                            if let Some(end) = self.handle(m, &channel, &tx).await {
                                return match end {
                                    HandleEnd::Release { reason, grace } => {
                                        Attempt::End(RelayEnd::Release { reason, grace, reporter: Box::new(Reporter::new(tx, down, heartbeat)) })
                                    }
                                };
                            }
                        }
                        Ok(None) => return dropped("gateway ended the control stream".into(), true),
                        Err(status) => return self.lost_down(status, true),
                    }
                }
                ev = events.recv() => {
                    if let Some(ev) = ev {
                        self.count_outcome(&ev);
                        let msg = SupervisorMessage { msg: Some(supervisor_message::Msg::SessionEvent(ev)) };
                        if let Err(why) = send_bounded(&tx, msg, heartbeat * 3).await {
                            return dropped(why, true);
                        }
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        return dropped(format!("no message from the gateway for {:?}", last_heard.elapsed()), true);
                    }
                    let hb = SupervisorMessage { msg: Some(supervisor_message::Msg::Heartbeat(proto::Heartbeat {})) };
                    if let Err(why) = send_bounded(&tx, hb, heartbeat * 3).await {
                        return dropped(why, true);
                    }
                }
            }
        }
    }

    fn classify(&self, status: tonic::Status, was_accepted: bool) -> Attempt {
        match status.code() {
            tonic::Code::PermissionDenied | tonic::Code::NotFound => Attempt::End(
                RelayEnd::ClaimGone(format!("{:?}: {}", status.code(), status.message())),
            ),
            code => Attempt::Dropped {
                was_accepted,
                why: format!("{code:?}: {}", status.message()),
                oversized: false,
            },
        }
    }

    /// The control stream's down side failed. A frame past the message limit cannot be
    /// decoded, and nothing after it on the stream can be either: the stream is lost,
    /// but only the stream. Sessions keep running, the next `Hello` lists them, and the
    /// gateway learns nothing about the oversized frame (its session never started).
    fn lost_down(&self, status: tonic::Status, was_accepted: bool) -> Attempt {
        if status.code() != tonic::Code::OutOfRange {
            return self.classify(status, was_accepted);
        }
        tracing::warn!(
            event = "relay.frame_too_large",
            limit = channel::MAX_MESSAGE_BYTES,
            error = status.message(),
            "the gateway sent a control frame past the message limit; it cannot be decoded, so the control stream is lost. Reconnecting; sessions keep running"
        );
        Attempt::Dropped {
            was_accepted,
            why: format!(
                "a control frame exceeded the {} byte message limit ({})",
                channel::MAX_MESSAGE_BYTES,
                status.message()
            ),
            oversized: true,
        }
    }

    fn count_outcome(&self, ev: &proto::SessionEvent) {
        use proto::session_event::Event;
        let m = &self.telemetry.metrics;
        match &ev.event {
            Some(Event::Exited(s)) => {
                m.sessions_active.dec();
                m.session_ended(if s.timed_out {
                    SessionOutcome::TimedOut
                } else if matches!(s.how, Some(proto::exit_status::How::Signal(_))) {
                    SessionOutcome::Signaled
                } else {
                    SessionOutcome::Exited
                });
            }
            Some(Event::Failed(_)) => m.session_ended(SessionOutcome::Failed),
            Some(Event::Started(_)) => {
                m.sessions_active.inc();
            }
            None => {}
        }
    }

    fn opener(&self, channel: &Channel, tx: &mpsc::Sender<SupervisorMessage>) -> Opener {
        Opener::new(
            channel.clone(),
            self.creds.clone(),
            self.telemetry.clone(),
            tx.clone(),
        )
    }

    async fn handle(
        &self,
        msg: proto::GatewayMessage,
        channel: &Channel,
        tx: &mpsc::Sender<SupervisorMessage>,
    ) -> Option<HandleEnd> {
        use gateway_message::Msg;
        match msg.msg? {
            Msg::Heartbeat(_) | Msg::Accepted(_) => {}
            Msg::OpenSession(open) => {
                // Off the control loop: a start can take up to the spawn timeout (a
                // tenant may stop the child before it execs), and heartbeats, other
                // sessions and Release must not wait for it. `open` reports Started or
                // Failed on the events channel, which this loop forwards.
                let (sessions, channel) = (self.sessions.clone(), channel.clone());
                let (creds, telemetry) = (self.creds.clone(), self.telemetry.clone());
                tokio::spawn(async move {
                    let spec = open.spec.unwrap_or_default();
                    if let Some(session) = sessions.open(&open.session_id, &spec).await {
                        stream::attach(channel, creds, session, 0, 0, telemetry, None);
                    }
                });
            }
            Msg::AttachSession(a) => {
                match self.sessions.get(&a.session_id) {
                    Some(session) => {
                        stream::attach(
                            channel.clone(),
                            self.creds.clone(),
                            session,
                            a.stdout_offset,
                            a.stderr_offset,
                            self.telemetry.clone(),
                            None,
                        );
                    }
                    None => {
                        let err = proto::Error { code: proto::ErrorCode::NotFound as i32, message: format!("unknown session id '{}': it was never opened or was already forgotten", a.session_id) };
                        tracing::info!(event = "session.attach_unknown", session_id = %a.session_id, "AttachSession for an unknown session");
                        let ev = proto::SessionEvent {
                            session_id: a.session_id,
                            event: Some(proto::session_event::Event::Failed(err)),
                        };
                        let msg = SupervisorMessage {
                            msg: Some(supervisor_message::Msg::SessionEvent(ev)),
                        };
                        let _ = send_bounded(tx, msg, EVENT_SEND_LIMIT).await;
                    }
                }
            }
            Msg::OpenFile(o) => self.files.open(o, self.opener(channel, tx)),
            Msg::OpenForward(o) => self.forwards.open(o, self.opener(channel, tx)),
            Msg::ForgetSession(f) => {
                if !self.sessions.forget(&f.session_id) {
                    tracing::debug!(event = "session.forget_unknown", session_id = %f.session_id, "forget for an unknown session");
                }
            }
            Msg::Release(r) => {
                let grace = (r.grace_ms > 0).then(|| Duration::from_millis(u64::from(r.grace_ms)));
                return Some(HandleEnd::Release {
                    reason: r.reason,
                    grace,
                });
            }
        }
        None
    }
}

enum HandleEnd {
    Release {
        reason: String,
        grace: Option<Duration>,
    },
}

/// Sends a report on a fresh control stream (when the release did not come through the
/// relay: a signal or a revoked claim). Best effort, bounded.
pub async fn report_fresh(
    endpoint: &GatewayEndpoint,
    creds: &SandboxCredentials,
    hello: proto::Hello,
    report: proto::ReleaseReport,
) -> bool {
    let fut = async {
        let ch = endpoint.channel().ok()?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(SupervisorMessage {
            msg: Some(supervisor_message::Msg::Hello(hello)),
        })
        .await
        .ok()?;
        let req = authed(ReceiverStream::new(rx), &creds.token()).ok()?;
        let mut down = channel::client(ch).connect(req).await.ok()?.into_inner();
        let _accepted = down.message().await.ok()??;
        tx.send(SupervisorMessage {
            msg: Some(supervisor_message::Msg::ReleaseReport(report)),
        })
        .await
        .ok()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .ok()
        .flatten()
        .is_some()
}
