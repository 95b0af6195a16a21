//! Per-stream output buffers with byte offsets: the replay buffer and the backpressure
//! point. Bytes stay until the gateway acknowledges them (`Ack`, or the offsets of an
//! `AttachSession`), so any stream attached later can resume exactly where the gateway
//! left off. When `capacity` unacknowledged bytes are held, the pump stops reading the
//! pipe and the process blocks on its next write: output is never dropped.
//!
//! Every buffer also draws on one [`OutputBudget`] shared by all sessions: the memory
//! of unacknowledged output, counted by what its chunks really allocate. Past it, every
//! pump stops reading, so many sessions together cannot grow the supervisor without
//! bound while the gateway does not acknowledge.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, Semaphore};

/// The global budget of unacknowledged output bytes, across sessions.
pub struct OutputBudget {
    permits: Semaphore,
    total: usize,
}

impl OutputBudget {
    pub fn new(total: usize) -> Arc<OutputBudget> {
        // At least one full read, so a single session always makes progress.
        let total = total.clamp(MIN_BUDGET, Semaphore::MAX_PERMITS);
        Arc::new(OutputBudget {
            permits: Semaphore::new(total),
            total,
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes of the budget held by unacknowledged output now.
    pub fn used(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    /// Waits for `n` bytes of the budget; the caller hands them to a chunk
    /// ([`OutputBuffer::push_charged`]) or gives back what it did not use. Cancel-safe:
    /// dropped before it completes, it holds nothing.
    pub async fn take(&self, n: usize) {
        if let Ok(p) = self.permits.acquire_many(n as u32).await {
            p.forget();
        }
    }

    /// Takes `n` bytes of the budget if they are free now.
    pub fn try_take(&self, n: usize) -> bool {
        match self.permits.try_acquire_many(n as u32) {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    pub fn give_back(&self, n: usize) {
        if n > 0 {
            self.permits.add_permits(n);
        }
    }
}

/// One read's worth: the pump never asks the budget for more at once.
pub const MAX_READ: usize = 256 * 1024;
const MIN_BUDGET: usize = MAX_READ;
/// Unacknowledged bytes a session may always hold, outside the budget: a session the
/// gateway reads keeps moving while sessions it ignores hold the whole budget. Memory
/// is then bounded by the budget plus this much per session.
pub const UNBUDGETED_FLOOR: usize = 16 * 1024;
/// `read_at` joins chunks into one frame while the first is shorter than this.
const COALESCE_BELOW: usize = 64 * 1024;

pub struct OutputBuffer {
    inner: Mutex<Inner>,
    budget: Arc<OutputBudget>,
    /// Woken when data arrives or the stream ends.
    readable: Notify,
    /// Woken when acknowledged data is freed.
    writable: Notify,
    capacity: usize,
}

struct Inner {
    /// Each chunk with the bytes of the budget it holds (its allocation).
    chunks: VecDeque<(Bytes, usize)>,
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
    pub fn new(capacity: usize, budget: Arc<OutputBudget>) -> Self {
        OutputBuffer {
            budget,
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

    /// The shared budget this buffer draws on.
    pub fn budget(&self) -> &OutputBudget {
        &self.budget
    }

    /// Appends `data`, which holds `charge` bytes already taken from the budget; they
    /// go back once the chunk is acknowledged (or the buffer dropped).
    pub fn push_charged(&self, data: Bytes, charge: usize) {
        if data.is_empty() {
            self.budget.give_back(charge);
            return;
        }
        {
            let mut i = self.lock();
            i.end += data.len() as u64;
            i.chunks.push_back((data, charge));
        }
        self.readable.notify_waiters();
    }

    /// Unacknowledged bytes held now.
    pub fn held(&self) -> usize {
        let i = self.lock();
        (i.end - i.start) as usize
    }

    /// A future that completes when acknowledged data is freed. Enable it before
    /// checking [`OutputBuffer::held`] so no wake-up is lost in between.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.writable.notified()
    }

    pub fn close(&self) {
        self.lock().eof = true;
        self.readable.notify_waiters();
    }

    /// Frees everything below `offset` (clamped to what exists).
    pub fn ack(&self, offset: u64) {
        let mut freed = 0;
        {
            let mut i = self.lock();
            let target = offset.min(i.end);
            while i.start < target {
                let remaining = (target - i.start) as usize;
                let Some((front, _)) = i.chunks.front_mut() else {
                    break;
                };
                let drop_n = remaining.min(front.len());
                if drop_n == front.len() {
                    // The allocation is free only once the whole chunk is.
                    freed += i.chunks.pop_front().map_or(0, |(_, charge)| charge);
                } else {
                    *front = front.slice(drop_n..);
                }
                i.start += drop_n as u64;
            }
        }
        self.budget.give_back(freed);
        self.writable.notify_waiters();
    }

    /// Up to `max` bytes starting at `offset`, without waiting. Consecutive chunks are
    /// joined into one (a copy) while the first is short: a process writing 4 KiB at a
    /// time leaves many small chunks behind a busy stream, and every frame costs far
    /// more on the way to the gateway than copying its bytes.
    pub fn read_at(&self, offset: u64, max: usize) -> Read {
        let mut parts: Vec<Bytes> = Vec::new();
        let mut total = 0;
        {
            let i = self.lock();
            if offset < i.start {
                return Read::Gone(i.start);
            }
            if offset >= i.end {
                return if i.eof { Read::Eof } else { Read::Pending };
            }
            let mut pos = i.start;
            for (chunk, _) in &i.chunks {
                let chunk_end = pos + chunk.len() as u64;
                if offset < chunk_end {
                    if !parts.is_empty() && chunk.len() >= COALESCE_BELOW {
                        break; // a long chunk goes in a frame of its own, uncopied
                    }
                    let from = offset.saturating_sub(pos) as usize;
                    let to = chunk.len().min(from + (max - total));
                    total += to - from;
                    parts.push(chunk.slice(from..to));
                    // A long first chunk goes as it is: no copy where none pays.
                    if total >= max || parts[0].len() >= COALESCE_BELOW {
                        break;
                    }
                }
                pos = chunk_end;
            }
        }
        match parts.len() {
            0 => Read::Pending,
            1 => Read::Data(parts.pop().expect("one part")),
            _ => {
                let mut joined = BytesMut::with_capacity(total);
                for part in &parts {
                    joined.extend_from_slice(part);
                }
                Read::Data(joined.freeze())
            }
        }
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

impl Drop for OutputBuffer {
    fn drop(&mut self) {
        let held: usize = self.lock().chunks.iter().map(|(_, c)| c).sum();
        self.budget.give_back(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_held_until_whole_chunks_are_acknowledged_or_dropped() {
        let budget = OutputBudget::new(0);
        let total = budget.total();
        let b = OutputBuffer::new(1 << 20, budget.clone());
        b.push_charged(Bytes::from_static(b"hello"), 100);
        b.push_charged(Bytes::from_static(b"world"), 200);
        // The charges were taken by the caller; the buffer hands them back.
        budget.permits.try_acquire_many(300).unwrap().forget();
        assert_eq!(budget.used(), 300);
        b.ack(3);
        assert_eq!(
            budget.used(),
            300,
            "a partly acknowledged chunk keeps its allocation"
        );
        b.ack(5);
        assert_eq!(budget.used(), 200);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.total(), total);
    }

    #[test]
    fn offsets_ack_and_replay() {
        let b = OutputBuffer::new(10, OutputBudget::new(0));
        let push = |d: &'static [u8]| b.push_charged(Bytes::from_static(d), 0);
        push(b"hello");
        push(b"world");
        assert_eq!(b.space(), 0);
        // Short chunks are joined into one frame, up to `max`.
        assert_eq!(
            b.read_at(3, 100),
            Read::Data(Bytes::from_static(b"loworld"))
        );
        assert_eq!(b.read_at(3, 4), Read::Data(Bytes::from_static(b"lowo")));
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

    #[test]
    fn long_chunks_are_sent_as_they_are() {
        let b = OutputBuffer::new(1 << 20, OutputBudget::new(0));
        let long = Bytes::from(vec![7u8; COALESCE_BELOW]);
        b.push_charged(Bytes::from_static(b"ab"), 0);
        b.push_charged(long.clone(), 0);
        b.push_charged(Bytes::from_static(b"cd"), 0);
        // The short head alone: the long chunk after it is not copied to join it.
        assert_eq!(
            b.read_at(0, MAX_READ),
            Read::Data(Bytes::from_static(b"ab"))
        );
        // The long one goes uncopied (same allocation), without the short tail.
        let Read::Data(got) = b.read_at(2, MAX_READ) else {
            panic!("data expected")
        };
        assert_eq!(got.as_ptr(), long.as_ptr());
        assert_eq!(got.len(), COALESCE_BELOW);
    }
}
