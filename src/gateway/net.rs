//! Accepted connections the gateway can close for real on `stop`: tonic's graceful
//! shutdown waits for long-lived streams, so each socket keeps a duplicate handle that
//! `shutdown_all` uses to shut the socket down under hyper (EOF to both sides).

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;

#[derive(Default)]
pub(crate) struct ConnRegistry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, std::net::TcpStream>>,
}

impl ConnRegistry {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, std::net::TcpStream>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn track(self: &Arc<Self>, stream: TcpStream) -> io::Result<TrackedIo> {
        stream.set_nodelay(true)?;
        let std_stream = stream.into_std()?;
        let dup = std_stream.try_clone()?;
        let inner = TcpStream::from_std(std_stream)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live().insert(id, dup);
        Ok(TrackedIo {
            inner,
            id,
            registry: Arc::clone(self),
        })
    }

    /// Shuts down every live connection (both directions).
    pub fn shutdown_all(&self) {
        for (_, s) in self.live().drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The accept stream for tonic, wrapping each connection.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<TrackedIo>> + Send + 'static {
        let registry = Arc::clone(self);
        futures::stream::unfold((listener, registry), |(listener, registry)| async move {
            let accepted = listener.accept().await;
            let item = accepted.and_then(|(s, _)| registry.track(s));
            Some((item, (listener, registry)))
        })
    }
}

pub(crate) struct TrackedIo {
    inner: TcpStream,
    id: u64,
    registry: Arc<ConnRegistry>,
}

impl Drop for TrackedIo {
    fn drop(&mut self) {
        self.registry.live().remove(&self.id);
    }
}

impl tonic::transport::server::Connected for TrackedIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
