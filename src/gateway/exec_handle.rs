//! The driver's handle on one exec session: `Exec` reads output and the exit in order
//! (acking as it consumes), `ExecInput` sends stdin, resizes and signals while the
//! `Exec` is read elsewhere. The `Session` stream handler on the other side of these
//! channels is in `sessions.rs`.

use super::sessions::SessionCore;
use crate::proto;
use crate::proto::session_down::Msg as DownMsg;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Acks are sent at least every this many consumed bytes, and whenever the consumer
/// has drained everything delivered so far.
pub const ACK_EVERY: u64 = 256 * 1024;

/// What the consumer of an exec session sees, in order; `Exited` is last.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exited(proto::ExitStatus),
}

/// Everything a session produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: proto::ExitStatus,
}

/// A running exec session, as the driver sees it.
pub struct Exec {
    pub(crate) core: Arc<SessionCore>,
    pub(crate) rx: mpsc::Receiver<ExecEvent>,
    pub(crate) pid: u32,
    pub(crate) consumed: (u64, u64),
    pub(crate) acked: (u64, u64),
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("session_id", &self.core.id)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// The input side of an exec session (stdin, resize, signal, reported errors),
/// usable while the `Exec` itself is being read: full duplex without sharing `&mut`.
#[derive(Clone)]
pub struct ExecInput {
    core: Arc<SessionCore>,
}

impl std::fmt::Debug for ExecInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecInput")
            .field("session_id", &self.core.id)
            .finish()
    }
}

impl ExecInput {
    async fn send_down(&self, msg: DownMsg) -> anyhow::Result<()> {
        send_down(&self.core, msg).await
    }

    /// Waits while `RETAIN_LIMIT` bytes of stdin are unacknowledged.
    pub async fn write_stdin(&self, data: Bytes) -> anyhow::Result<()> {
        write_stdin(&self.core, data).await
    }

    pub async fn close_stdin(&self) -> anyhow::Result<()> {
        close_stdin(&self.core).await
    }

    pub async fn resize(&self, cols: u32, rows: u32) -> anyhow::Result<()> {
        self.send_down(DownMsg::Resize(proto::Resize { cols, rows }))
            .await
    }

    pub async fn signal(&self, sig: i32) -> anyhow::Result<()> {
        self.send_down(DownMsg::Signal(proto::Signal { signal: sig }))
            .await
    }

    /// The next error the supervisor reported for a frame of this session, waiting up
    /// to `timeout`.
    pub async fn next_error(&self, timeout: Duration) -> Option<proto::Error> {
        let mut rx = self.core.errors_rx.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }
}

fn check_open(core: &SessionCore) -> anyhow::Result<()> {
    if core.complete.load(Ordering::Acquire) {
        anyhow::bail!("session {} has exited; nothing to send to", core.id);
    }
    Ok(())
}

async fn reserve_down(core: &SessionCore) -> anyhow::Result<mpsc::Permit<'_, proto::SessionDown>> {
    core.down_tx
        .reserve()
        .await
        .map_err(|_| anyhow::anyhow!("session {} is closed", core.id))
}

async fn write_stdin(core: &SessionCore, data: Bytes) -> anyhow::Result<()> {
    check_open(core)?;
    core.stdin.room().await;
    check_open(core)?;
    let permit = reserve_down(core).await?;
    core.stdin.send_data(permit, data);
    Ok(())
}

async fn close_stdin(core: &SessionCore) -> anyhow::Result<()> {
    check_open(core)?;
    let permit = reserve_down(core).await?;
    core.stdin.send_eof(permit);
    Ok(())
}

async fn send_down(core: &SessionCore, msg: DownMsg) -> anyhow::Result<()> {
    check_open(core)?;
    core.down_tx
        .send(proto::SessionDown { msg: Some(msg) })
        .await
        .map_err(|_| anyhow::anyhow!("session {} is closed", core.id))
}

impl Exec {
    pub fn session_id(&self) -> &str {
        &self.core.id
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle for input while this `Exec` is read elsewhere.
    pub fn input(&self) -> ExecInput {
        ExecInput {
            core: Arc::clone(&self.core),
        }
    }

    // The input side is `ExecInput`'s; these are its methods on the whole handle.

    /// See [`ExecInput::next_error`].
    pub async fn next_error(&self, timeout: Duration) -> Option<proto::Error> {
        self.input().next_error(timeout).await
    }

    /// See [`ExecInput::write_stdin`].
    pub async fn write_stdin(&self, data: Bytes) -> anyhow::Result<()> {
        self.input().write_stdin(data).await
    }

    pub async fn close_stdin(&self) -> anyhow::Result<()> {
        self.input().close_stdin().await
    }

    pub async fn resize(&self, cols: u32, rows: u32) -> anyhow::Result<()> {
        self.input().resize(cols, rows).await
    }

    pub async fn signal(&self, sig: i32) -> anyhow::Result<()> {
        self.input().signal(sig).await
    }

    /// The next output chunk or the exit; None when the session ended without an exit
    /// (it was lost) or after `Exited` was returned.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        let ev = self.rx.recv().await?;
        match &ev {
            ExecEvent::Stdout(b) => self.consumed.0 += b.len() as u64,
            ExecEvent::Stderr(b) => self.consumed.1 += b.len() as u64,
            ExecEvent::Exited(_) => {}
        }
        let since = (self.consumed.0 - self.acked.0) + (self.consumed.1 - self.acked.1);
        if since > 0 && (since >= ACK_EVERY || self.rx.is_empty()) {
            self.acked = self.consumed;
            self.core.ack.send_replace(self.consumed);
        }
        Some(ev)
    }

    /// Reads everything until the exit.
    pub async fn collect(mut self) -> anyhow::Result<ExecOutput> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(ev) = self.next().await {
            match ev {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exited(exit) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        exit,
                    })
                }
            }
        }
        anyhow::bail!(
            "session {} ended without an exit status after {} stdout and {} stderr bytes: the supervisor lost it",
            self.core.id,
            stdout.len(),
            stderr.len()
        )
    }
}
