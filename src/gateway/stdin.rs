//! Stdin on the gateway side: every byte the driver writes gets an offset and is
//! retained until the supervisor acknowledges it (`StdinAck`), so a stream that drops
//! with stdin in flight loses nothing: the next stream's `Attach` says where the
//! supervisor stands, and the retained tail (and a pending EOF) is sent again from
//! there. The supervisor ignores bytes it already has, so resending too much is safe.
//!
//! Retention is bounded: past `RETAIN_LIMIT` unacknowledged bytes the driver's
//! `write_stdin` waits (backpressure), it never drops.

use crate::proto;
use crate::proto::session_down::Msg as DownMsg;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::{mpsc, Notify};

/// Unacknowledged stdin bytes per session before `write_stdin` waits.
pub const RETAIN_LIMIT: u64 = 8 << 20;

/// A frame this large is past the protocol's message limit: the supervisor cannot
/// decode it and discards it (answering `INVALID_ARGUMENT`). It is sent once, so the
/// driver learns that, but takes no offsets and is not retained: resending it would
/// only break the next stream too.
const UNDELIVERABLE: usize = crate::relay::channel::MAX_MESSAGE_BYTES;

#[derive(Default)]
struct StdinOut {
    /// The offset of the next byte the driver writes.
    next: u64,
    /// The supervisor has accepted everything below this.
    acked: u64,
    /// Written but not acknowledged, contiguous and in order: (offset, bytes).
    retained: VecDeque<(u64, Bytes)>,
    /// The driver closed stdin after this many bytes.
    eof: Option<u64>,
    /// End of the stdin handed to a stream so far: a resend covers below this; the
    /// rest is still queued and goes out in order anyway.
    sent_end: u64,
    eof_sent: bool,
    /// The supervisor said stdin is closed for good: nothing more is retained.
    closed: bool,
    /// The supervisor does not track stdin offsets (its `Attach` had none): it never
    /// acknowledges and does not deduplicate, so nothing is retained or resent.
    legacy: bool,
}

impl StdinOut {
    fn has_room(&self) -> bool {
        self.legacy || self.closed || self.eof.is_some() || self.next - self.acked < RETAIN_LIMIT
    }

    fn free_below(&mut self, offset: u64) {
        self.acked = self.acked.max(offset);
        while let Some((off, data)) = self.retained.front_mut() {
            let end = *off + data.len() as u64;
            if end <= self.acked {
                self.retained.pop_front();
            } else {
                if *off < self.acked {
                    *data = data.slice((self.acked - *off) as usize..);
                    *off = self.acked;
                }
                break;
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct StdinRetention {
    state: Mutex<StdinOut>,
    freed: Notify,
}

fn down(msg: DownMsg) -> proto::SessionDown {
    proto::SessionDown { msg: Some(msg) }
}

impl StdinRetention {
    fn lock(&self) -> std::sync::MutexGuard<'_, StdinOut> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until fewer than `RETAIN_LIMIT` bytes are unacknowledged.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.lock().has_room() {
                return;
            }
            freed.await;
        }
    }

    /// Gives `data` its offset, retains it, and queues it with `permit`, all under one
    /// lock, so the queue's order is the offsets' order.
    pub fn send_data(&self, permit: mpsc::Permit<'_, proto::SessionDown>, data: Bytes) {
        let mut st = self.lock();
        let offset = st.next;
        // After an EOF or a close, stdin is only sent to be refused: it takes no offsets.
        if st.eof.is_none() && !st.closed && data.len() < UNDELIVERABLE {
            st.next += data.len() as u64;
            if !st.legacy {
                st.retained.push_back((offset, data.clone()));
            }
        }
        permit.send(down(DownMsg::Stdin(proto::Stdin {
            data,
            offset: Some(offset),
        })));
    }

    /// Marks stdin closed after what was written, and queues the EOF with `permit`.
    pub fn send_eof(&self, permit: mpsc::Permit<'_, proto::SessionDown>) {
        let mut st = self.lock();
        let next = st.next;
        let offset = *st.eof.get_or_insert(next);
        permit.send(down(DownMsg::StdinEof(proto::StdinEof {
            offset: Some(offset),
        })));
        drop(st);
        // An EOF ends the wait of any writer (what it writes now is only refused).
        self.freed.notify_waiters();
    }

    /// A stream took `frame` (in queue order): the resend of a later stream covers it.
    pub fn sent(&self, frame: &proto::SessionDown) {
        let mut st = self.lock();
        match &frame.msg {
            Some(DownMsg::Stdin(s)) => {
                let end = s.offset.unwrap_or(st.sent_end) + s.data.len() as u64;
                // Frames that took no offsets (after EOF, oversized) do not count.
                if end <= st.next {
                    st.sent_end = st.sent_end.max(end);
                }
            }
            Some(DownMsg::StdinEof(_)) => st.eof_sent = true,
            _ => return,
        }
        if st.legacy {
            let end = st.sent_end;
            st.free_below(end);
            drop(st);
            self.freed.notify_waiters();
        }
    }

    /// A new stream attached with the supervisor's `Attach.stdin_offset`: the frames to
    /// send on it first (what was sent before but not accepted, and a pending EOF).
    pub fn resend_from(&self, stdin_offset: Option<u64>) -> Vec<proto::SessionDown> {
        let mut st = self.lock();
        let Some(from) = stdin_offset else {
            st.legacy = true;
            st.retained.clear();
            st.acked = st.next;
            drop(st);
            self.freed.notify_waiters();
            return Vec::new();
        };
        st.legacy = false;
        st.free_below(from);
        let mut frames = Vec::new();
        if st.closed {
            return frames;
        }
        for (off, data) in &st.retained {
            if *off >= st.sent_end {
                break;
            }
            frames.push(down(DownMsg::Stdin(proto::Stdin {
                data: data.clone(),
                offset: Some(*off),
            })));
        }
        if let (Some(eof), true) = (st.eof, st.eof_sent) {
            frames.push(down(DownMsg::StdinEof(proto::StdinEof {
                offset: Some(eof),
            })));
        }
        drop(st);
        self.freed.notify_waiters();
        frames
    }

    /// The supervisor accepted everything below `offset`; `closed`: stdin is closed for
    /// good, so nothing retained is needed any more.
    pub fn acked(&self, offset: u64, closed: bool) {
        let mut st = self.lock();
        st.free_below(offset);
        if closed {
            st.closed = true;
            st.retained.clear();
        }
        drop(st);
        self.freed.notify_waiters();
    }

    /// The session is over: wake writers (they find it complete).
    pub fn finish(&self) {
        self.lock().closed = true;
        self.freed.notify_waiters();
    }

    /// Unacknowledged bytes retained now.
    #[cfg(test)]
    pub fn retained_bytes(&self) -> u64 {
        self.lock()
            .retained
            .iter()
            .map(|(_, d)| d.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_of(f: &proto::SessionDown) -> (u64, Vec<u8>) {
        match &f.msg {
            Some(DownMsg::Stdin(s)) => (s.offset.unwrap(), s.data.to_vec()),
            other => panic!("expected Stdin, got {other:?}"),
        }
    }

    async fn write(r: &StdinRetention, tx: &mpsc::Sender<proto::SessionDown>, d: &'static [u8]) {
        r.room().await;
        r.send_data(tx.reserve().await.unwrap(), Bytes::from_static(d));
    }

    #[tokio::test]
    async fn resends_from_the_attach_offset_and_frees_on_ack() {
        let r = StdinRetention::default();
        let (tx, mut rx) = mpsc::channel(8);
        write(&r, &tx, b"hello ").await;
        write(&r, &tx, b"world").await;
        r.send_eof(tx.reserve().await.unwrap());
        for _ in 0..3 {
            r.sent(&rx.recv().await.unwrap());
        }
        // The supervisor had accepted "hel": the rest and the EOF go again.
        let again = r.resend_from(Some(3));
        assert_eq!(again.len(), 3, "{again:?}");
        assert_eq!(data_of(&again[0]), (3, b"lo ".to_vec()));
        assert_eq!(data_of(&again[1]), (6, b"world".to_vec()));
        assert_eq!(
            again[2].msg,
            Some(DownMsg::StdinEof(proto::StdinEof { offset: Some(11) }))
        );
        r.acked(8, false);
        assert_eq!(r.retained_bytes(), 3);
        r.acked(11, true);
        assert_eq!(r.retained_bytes(), 0);
        assert!(r.resend_from(Some(11)).is_empty());
    }

    #[tokio::test]
    async fn unsent_frames_are_not_resent_and_legacy_retains_nothing() {
        let r = StdinRetention::default();
        let (tx, mut rx) = mpsc::channel(8);
        write(&r, &tx, b"abc").await;
        write(&r, &tx, b"def").await;
        r.sent(&rx.recv().await.unwrap());
        // "def" is still queued: it follows the resend in order by itself.
        let again = r.resend_from(Some(0));
        assert_eq!(again.len(), 1);
        assert_eq!(data_of(&again[0]), (0, b"abc".to_vec()));
        assert!(r.resend_from(None).is_empty());
        assert_eq!(r.retained_bytes(), 0);
        write(&r, &tx, b"ghi").await;
        assert_eq!(data_of(&rx.recv().await.unwrap()), (3, b"def".to_vec()));
        let ghi = rx.recv().await.unwrap();
        assert_eq!(data_of(&ghi), (6, b"ghi".to_vec()));
        r.sent(&ghi);
        assert_eq!(r.retained_bytes(), 0);
    }

    #[tokio::test]
    async fn writers_wait_past_the_limit_until_an_ack() {
        let r = std::sync::Arc::new(StdinRetention::default());
        let (tx, mut rx) = mpsc::channel(8);
        let big = Bytes::from(vec![0u8; 3 << 20]);
        for _ in 0..3 {
            r.room().await;
            r.send_data(tx.reserve().await.unwrap(), big.clone());
        }
        let waiting = {
            let r = r.clone();
            tokio::spawn(async move { r.room().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "past the limit a writer must wait");
        r.sent(&rx.recv().await.unwrap());
        r.acked(big.len() as u64, false);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("an ack frees room")
            .unwrap();
    }
}
