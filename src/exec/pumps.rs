//! A session's I/O pumps: process output into the replay buffers (stopping while a
//! buffer is full, so backpressure reaches the process), and gateway stdin into the
//! process's pipe or terminal.

use bytes::{Bytes, BytesMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::output::{OutputBuffer, MAX_READ, UNBUDGETED_FLOOR};
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
/// reading while the buffer is full or the global output budget is used up.
pub(crate) async fn pump(fd: OwnedFd, session: Arc<Session>, which: Stream) {
    let buf = match which {
        Stream::Stdout => &session.stdout,
        Stream::Stderr => &session.stderr,
    };
    if let Ok(afd) = register(fd, Interest::READABLE) {
        loop {
            buf.wait_space().await;
            let Ok(mut guard) = afd.readable().await else {
                break;
            };
            // Taken once there is something to read, so idle sessions hold none of it.
            let (want, charged) = reserve(buf).await;
            let mut chunk = BytesMut::with_capacity(want);
            let res = guard.try_io(|inner| {
                // A process writing small pieces (head: 4 KiB) would otherwise make a
                // chunk per piece: read on while the pipe has more and there is room.
                let mut got = 0;
                loop {
                    // SAFETY: read(2) writes at most `want - got` bytes into the spare
                    // capacity reserved above; we only extend the length by what it
                    // reports.
                    let n = unsafe {
                        libc::read(
                            inner.as_raw_fd(),
                            chunk.spare_capacity_mut()[got..].as_mut_ptr().cast(),
                            want - got,
                        )
                    };
                    if n > 0 {
                        got += n as usize;
                        if got < want {
                            continue;
                        }
                    }
                    // Full, or the pipe is empty (EAGAIN) or at EOF after some bytes:
                    // deliver these; the next readiness check finds the rest.
                    if got > 0 || n == 0 {
                        return Ok(got);
                    }
                    return Err(std::io::Error::last_os_error());
                }
            });
            let n = match res {
                Ok(Ok(n)) => n,
                _ => 0,
            };
            if n > 0 {
                // SAFETY: the kernel initialised the first `n` bytes.
                unsafe { chunk.set_len(n) };
                if n < want / 2 {
                    // A short read would pin the whole allocation: keep a copy of the
                    // right size instead, and charge only that.
                    let keep = charged.min(n);
                    buf.budget().give_back(charged - keep);
                    buf.push_charged(Bytes::copy_from_slice(&chunk), keep);
                } else {
                    buf.push_charged(chunk.freeze(), charged);
                }
                continue;
            }
            buf.budget().give_back(charged);
            match res {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EIO: every holder of a PTY's slave side closed it; that is EOF.
                Ok(Err(_)) => break,
                Err(_would_block) => {}
            }
        }
    }
    buf.close();
}

/// How much to read next and how much of it the budget covers: all of it when the
/// budget has room, else a session holding little may still read up to the floor,
/// uncharged; else wait for the budget or for this session's own acknowledgements.
async fn reserve(buf: &OutputBuffer) -> (usize, usize) {
    loop {
        let want = buf.space().clamp(1, MAX_READ);
        if buf.budget().try_take(want) {
            return (want, want);
        }
        let freed = buf.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let held = buf.held();
        if held < UNBUDGETED_FLOOR {
            return ((UNBUDGETED_FLOOR - held).min(want), 0);
        }
        tokio::select! {
            _ = buf.budget().take(want) => return (want, want),
            _ = &mut freed => {}
        }
    }
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
