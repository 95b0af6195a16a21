//! A session's I/O pumps: process output into the replay buffers (stopping while a
//! buffer is full, so backpressure reaches the process), and gateway stdin into the
//! process's pipe or terminal.

use bytes::{Bytes, BytesMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::Session;

pub(crate) enum StdinCmd {
    Data(Bytes),
    Eof,
}

fn register(fd: OwnedFd, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` stays open and refers to the same description until the
    // `AsyncFd` that owns it is dropped, which is exactly tokio's requirement.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

#[derive(Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Moves bytes from the process's pipe (or PTY master) into the replay buffer, and stops
/// reading while the buffer is full.
pub(crate) async fn pump(fd: OwnedFd, session: Arc<Session>, which: Stream) {
    let buf = match which {
        Stream::Stdout => &session.stdout,
        Stream::Stderr => &session.stderr,
    };
    if let Ok(afd) = register(fd, Interest::READABLE) {
        loop {
            buf.wait_space().await;
            let want = buf.space().clamp(1, 256 * 1024);
            let Ok(mut guard) = afd.readable().await else {
                break;
            };
            let mut chunk = BytesMut::with_capacity(want);
            let res = guard.try_io(|inner| {
                // SAFETY: read(2) writes at most `want` bytes into the spare capacity
                // reserved above; we only extend the length by what it reports.
                let n = unsafe {
                    libc::read(
                        inner.as_raw_fd(),
                        chunk.spare_capacity_mut().as_mut_ptr().cast(),
                        want,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    // SAFETY: the kernel initialised the first `n` bytes.
                    unsafe { chunk.set_len(n) };
                    buf.push(chunk.freeze());
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EIO: every holder of a PTY's slave side closed it; that is EOF.
                Ok(Err(_)) => break,
                Err(_would_block) => {}
            }
        }
    }
    buf.close();
}

pub(crate) async fn stdin_writer(fd: OwnedFd, mut rx: mpsc::Receiver<StdinCmd>, is_tty: bool) {
    let Ok(afd) = register(fd, Interest::WRITABLE) else {
        return;
    };
    while let Some(cmd) = rx.recv().await {
        let data = match cmd {
            StdinCmd::Data(d) => d,
            // A PTY has no half-close: EOF is the terminal's EOF character (^D).
            StdinCmd::Eof if is_tty => Bytes::from_static(b"\x04"),
            StdinCmd::Eof => return, // dropping the fd closes the pipe
        };
        let mut rest = &data[..];
        while !rest.is_empty() {
            let Ok(mut guard) = afd.writable().await else {
                return;
            };
            match guard.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), rest).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => rest = &rest[n..],
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EPIPE: the process closed its stdin; discard the rest quietly.
                Ok(Err(_)) => return,
                Err(_would_block) => {}
            }
        }
        if is_tty && data.as_ref() == b"\x04" && rx.is_closed() {
            return;
        }
    }
}
