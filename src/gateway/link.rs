//! A loopback TCP proxy with faults, for tests: put it between a supervisor and the
//! gateway, then `cut_all` (every live connection closed at once, mid-stream) or
//! `pause` (a blackhole: nothing forwarded, nothing closed — a half-open connection).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// At most this many connections are proxied at once; more are refused (closed).
pub const MAX_CONNECTIONS: usize = 256;
const CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("binding the faulty link on 127.0.0.1: {0}")]
    Bind(std::io::Error),
}

struct Control {
    /// Bumped by `cut_all`; each connection dies when it changes.
    cut: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    live: AtomicUsize,
}

/// The proxy. Stops (listener and every connection) when dropped.
pub struct FaultyLink {
    addr: SocketAddr,
    target: SocketAddr,
    control: Arc<Control>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyLink")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl FaultyLink {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Result<FaultyLink, LinkError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(LinkError::Bind)?;
        let addr = listener.local_addr().map_err(LinkError::Bind)?;
        let control = Arc::new(Control {
            cut: watch::channel(0).0,
            paused: watch::channel(false).0,
            live: AtomicUsize::new(0),
        });
        let ctl = Arc::clone(&control);
        let accept_task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        if ctl.live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                            continue; // dropped: refused
                        }
                        conns.spawn(proxy(Arc::clone(&ctl), client, target));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(FaultyLink {
            addr,
            target,
            control,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://…` for a client to dial through the link.
    pub fn endpoint(&self, tls: bool) -> String {
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }

    /// Closes every live connection now (both sides see the TCP connection drop).
    pub fn cut_all(&self) {
        self.control.cut.send_modify(|g| *g += 1);
    }

    /// Stops forwarding in both directions without closing anything.
    pub fn pause(&self) {
        self.control.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.control.paused.send_replace(false);
    }

    /// Connections currently proxied.
    pub fn live_connections(&self) -> usize {
        self.control.live.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every connection.
    pub fn stop(self) {}
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.accept_task.abort();
    }
}

struct LiveGuard(Arc<Control>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn proxy(ctl: Arc<Control>, client: TcpStream, target: SocketAddr) {
    ctl.live.fetch_add(1, Ordering::Relaxed);
    let _guard = LiveGuard(Arc::clone(&ctl));
    let mut cut = ctl.cut.subscribe();
    cut.borrow_and_update();
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, ctl.paused.subscribe());
    let down = pump(ur, cw, ctl.paused.subscribe());
    tokio::select! {
        _ = cut.changed() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
    // Dropping both halves of both sockets closes the connections.
}

/// Copies one direction, holding data while paused. Ends on EOF or error and then
/// half-closes the other side.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Data read just before a pause is held until resume, not delivered.
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
