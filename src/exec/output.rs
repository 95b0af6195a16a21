//! Per-stream output buffers with byte offsets: the replay buffer and the backpressure
//! point. Bytes stay until the gateway acknowledges them (`Ack`, or the offsets of an
//! `AttachSession`), so any stream attached later can resume exactly where the gateway
//! left off. When `capacity` unacknowledged bytes are held, the pump stops reading the
//! pipe and the process blocks on its next write: output is never dropped.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

pub struct OutputBuffer {
    inner: Mutex<Inner>,
    /// Woken when data arrives or the stream ends.
    readable: Notify,
    /// Woken when acknowledged data is freed.
    writable: Notify,
    capacity: usize,
}

struct Inner {
    chunks: VecDeque<Bytes>,
    /// Offset of the first retained byte.
    start: u64,
    /// Offset one past the last byte (total bytes the process wrote so far).
    end: u64,
    eof: bool,
}

/// What a reader finds at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Data(Bytes),
    /// Nothing there yet.
    Pending,
    /// The stream ended at this offset.
    Eof,
    /// The bytes were already acknowledged and freed; the earliest offset still held.
    Gone(u64),
}

impl OutputBuffer {
    pub fn new(capacity: usize) -> Self {
        OutputBuffer {
            inner: Mutex::new(Inner {
                chunks: VecDeque::new(),
                start: 0,
                end: 0,
                eof: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes that may be added before the buffer is full.
    pub fn space(&self) -> usize {
        let i = self.lock();
        self.capacity.saturating_sub((i.end - i.start) as usize)
    }

    /// Waits until there is room for at least one more byte.
    pub async fn wait_space(&self) {
        loop {
            let notified = self.writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.space() > 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn push(&self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        {
            let mut i = self.lock();
            i.end += data.len() as u64;
            i.chunks.push_back(data);
        }
        self.readable.notify_waiters();
    }

    pub fn close(&self) {
        self.lock().eof = true;
        self.readable.notify_waiters();
    }

    /// Frees everything below `offset` (clamped to what exists).
    pub fn ack(&self, offset: u64) {
        {
            let mut i = self.lock();
            let target = offset.min(i.end);
            while i.start < target {
                let remaining = (target - i.start) as usize;
                let Some(front) = i.chunks.front_mut() else {
                    break;
                };
                let drop_n = remaining.min(front.len());
                if drop_n == front.len() {
                    i.chunks.pop_front();
                } else {
                    *front = front.slice(drop_n..);
                }
                i.start += drop_n as u64;
            }
        }
        self.writable.notify_waiters();
    }

    /// Up to `max` bytes starting at `offset`, without waiting.
    pub fn read_at(&self, offset: u64, max: usize) -> Read {
        let i = self.lock();
        if offset < i.start {
            return Read::Gone(i.start);
        }
        if offset >= i.end {
            return if i.eof { Read::Eof } else { Read::Pending };
        }
        let mut pos = i.start;
        for chunk in &i.chunks {
            let chunk_end = pos + chunk.len() as u64;
            if offset < chunk_end {
                let from = (offset - pos) as usize;
                let to = chunk.len().min(from + max);
                return Read::Data(chunk.slice(from..to));
            }
            pos = chunk_end;
        }
        Read::Pending
    }

    /// A future that completes on the next push or close. Enable it before checking
    /// `read_at` so no wake-up is lost in between.
    pub fn readable(&self) -> tokio::sync::futures::Notified<'_> {
        self.readable.notified()
    }

    /// Offset of the first byte still held (everything below was acknowledged).
    pub fn start(&self) -> u64 {
        self.lock().start
    }

    pub fn end(&self) -> u64 {
        self.lock().end
    }

    pub fn is_eof(&self) -> bool {
        self.lock().eof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_ack_and_replay() {
        let b = OutputBuffer::new(10);
        b.push(Bytes::from_static(b"hello"));
        b.push(Bytes::from_static(b"world"));
        assert_eq!(b.space(), 0);
        assert_eq!(b.read_at(3, 100), Read::Data(Bytes::from_static(b"lo")));
        assert_eq!(b.read_at(5, 3), Read::Data(Bytes::from_static(b"wor")));
        assert_eq!(b.read_at(10, 3), Read::Pending);
        b.ack(7);
        assert_eq!(b.space(), 7);
        assert_eq!(b.read_at(6, 3), Read::Gone(7));
        assert_eq!(b.read_at(7, 10), Read::Data(Bytes::from_static(b"rld")));
        b.close();
        assert_eq!(b.read_at(10, 1), Read::Eof);
        b.ack(1_000);
        assert_eq!(b.space(), 10);
    }
}
