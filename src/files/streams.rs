//! The two streaming operations: a read sends the file in frames; a write takes frames
//! into its temporary file, parks across a broken stream for the resume window, and
//! renames into place only after `FileEnd` and the checks.

use super::*;

pub(super) async fn serve_read(
    inner: &Inner,
    id: &str,
    req: proto::ReadFile,
    opener: &Opener,
) -> Outcome {
    let roots = inner.roots.clone();
    let r2 = req.clone();
    let prepared = inner
        .worker
        .run(move || transfer::begin_read(&roots, &r2))
        .await
        .and_then(|r| r);
    let state = match prepared {
        Ok(s) => s,
        Err(e) => return simple(inner, id, Err(e), opener).await,
    };
    let Some((tx, call)) = open_stream(opener, id, req.offset).await else {
        return Outcome::Interrupted;
    };
    let (cancel_tx, mut cancel_rx) = tokio::sync::oneshot::channel::<DownEnd>();
    let receiver = tokio::spawn(async move {
        match call.await {
            Ok(resp) => {
                let mut down = resp.into_inner();
                let end = loop {
                    match down.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break DownEnd::Closed,
                        Err(s) => break DownEnd::Broken(s.message().to_owned()),
                    }
                };
                let _ = cancel_tx.send(end);
            }
            Err(s) => {
                let _ = cancel_tx.send(DownEnd::Broken(s.message().to_owned()));
            }
        }
    });
    let _abort_receiver = AbortOnDrop(receiver.abort_handle());
    let mut sent = 0u64;
    // One chunk is read ahead: the worker reads the next while this task sends the last.
    let read_ahead = |mut state: transfer::ReadState| {
        inner.worker.submit(move || {
            let start = state.pos;
            let chunk = state.next(READ_CHUNK);
            (state, start, chunk)
        })
    };
    let mut next = read_ahead(state);
    let result: Result<proto::FileResult, FileError> = loop {
        let (state, pos, chunk) = tokio::select! {
            r = next => match r {
                Ok(v) => v,
                Err(e) => break Err(e),
            },
            end = &mut cancel_rx => return read_ended(id, end),
        };
        let chunk = match chunk {
            Ok(c) => bytes::Bytes::from(c),
            Err(e) => break Err(e),
        };
        if chunk.is_empty() {
            let size = state.size;
            match inner
                .worker
                .run(move || state.digest())
                .await
                .and_then(|r| r)
            {
                Ok(d) => {
                    break Ok(proto::FileResult {
                        sha256: d,
                        bytes: sent,
                        info: Some(proto::FileInfo {
                            r#type: proto::FileType::File as i32,
                            size,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                }
                Err(e) => break Err(e),
            }
        }
        next = read_ahead(state);
        sent += chunk.len() as u64;
        inner
            .telemetry
            .metrics
            .file_bytes("down", chunk.len() as u64);
        let mut at = 0;
        while at < chunk.len() {
            let end = (at + READ_FRAME).min(chunk.len());
            let frame = up(file_up::Msg::Data(proto::FileData {
                offset: pos + at as u64,
                data: chunk.slice(at..end),
            }));
            at = end;
            tokio::select! {
                r = tx.send(frame) => if r.is_err() { return Outcome::Interrupted },
                end = &mut cancel_rx => return read_ended(id, end),
            }
        }
    };
    let last = match &result {
        Ok(r) => up(file_up::Msg::Result(r.clone())),
        Err(e) => error_frame(e),
    };
    let _ = tx.send(last).await;
    drop(tx);
    let _ = tokio::time::timeout(LINGER, &mut cancel_rx).await;
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Failed(e),
    }
}

pub(super) fn read_ended(
    id: &str,
    end: Result<DownEnd, tokio::sync::oneshot::error::RecvError>,
) -> Outcome {
    match end {
        Ok(DownEnd::Broken(why)) => {
            tracing::info!(event = "file.read_interrupted", transfer_id = %id, error = %why, "read stream broke; the gateway resumes from its offset");
            Outcome::Interrupted
        }
        _ => Outcome::Cancelled,
    }
}

pub(super) struct AbortOnDrop(pub(super) AbortHandle);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Finds or starts the write `id`: a re-attach of a parked or finished one (same
/// `WriteFile`), or a new temporary file.
async fn attach_write(
    inner: &Arc<Inner>,
    id: &str,
    req: &proto::WriteFile,
) -> Result<Arc<Upload>, FileError> {
    let existing = {
        let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.uploads.get(id).cloned()
    };
    if let Some(u) = existing {
        if u.req != *req {
            return Err(FileError::new(
                ErrorCode::AlreadyExists,
                format!("transfer id '{id}' names another write; use a new id"),
            ));
        }
        u.epoch.fetch_add(1, Ordering::SeqCst);
        return Ok(u);
    }
    let roots = inner.roots.clone();
    let (r2, max) = (req.clone(), inner.cfg.max_file_size);
    let w = inner
        .worker
        .run(move || transfer::begin_write(&roots, &r2, max))
        .await??;
    tracing::info!(event = "file.write_started", transfer_id = %id, path = %w.request().path, "write started");
    let u = Arc::new(Upload {
        req: req.clone(),
        slot: Arc::new(Mutex::new(Slot::Active(w))),
        epoch: AtomicU64::new(1),
    });
    let closed = {
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.closed {
            st.uploads.insert(id.to_owned(), u.clone());
        }
        st.closed
    };
    if closed {
        discard(inner, &u).await;
        return Err(FileError::new(
            ErrorCode::Unavailable,
            "the sandbox is releasing",
        ));
    }
    Ok(u)
}

async fn discard(inner: &Inner, u: &Upload) {
    let slot = u.slot.clone();
    let _ = inner
        .worker
        .run(move || {
            let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
            if let Slot::Active(w) = std::mem::replace(&mut *g, Slot::Gone) {
                w.discard();
            }
        })
        .await;
}

/// Forgets the write `id` (and discards its temporary file) once the resume window has
/// passed without a new attach.
fn arm_expiry(inner: &Arc<Inner>, id: &str, u: &Arc<Upload>) {
    let (inner, id, u) = (inner.clone(), id.to_owned(), u.clone());
    let epoch = u.epoch.load(Ordering::SeqCst);
    tokio::spawn(async move {
        tokio::time::sleep(inner.cfg.resume_window).await;
        if u.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.running.contains_key(&id)
                || !st.uploads.get(&id).is_some_and(|x| Arc::ptr_eq(x, &u))
            {
                return;
            }
            st.uploads.remove(&id);
        }
        discard(&inner, &u).await;
        tracing::info!(event = "file.write_expired", transfer_id = %id, "interrupted write not resumed within the window; temporary file removed");
    });
}

fn forget(inner: &Inner, id: &str, u: &Arc<Upload>) {
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    if st.uploads.get(id).is_some_and(|x| Arc::ptr_eq(x, u)) {
        st.uploads.remove(id);
    }
}

pub(super) async fn serve_write(
    inner: &Arc<Inner>,
    id: &str,
    req: proto::WriteFile,
    opener: &Opener,
) -> Outcome {
    let u = match attach_write(inner, id, &req).await {
        Ok(u) => u,
        Err(e) => return simple(inner, id, Err(e), opener).await,
    };
    let (offset, done) = {
        let g = u.slot.lock().unwrap_or_else(|e| e.into_inner());
        match &*g {
            Slot::Active(w) => (w.accepted, None),
            Slot::Done(r) => (r.bytes, Some(r.clone())),
            Slot::Gone => (0, None),
        }
    };
    if let Some(r) = done {
        return simple(inner, id, Ok(r), opener).await;
    }
    let Some((tx, call)) = open_stream(opener, id, offset).await else {
        arm_expiry(inner, id, &u);
        return Outcome::Interrupted;
    };
    let mut down = match call.await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::debug!(event = "file.stream_failed", transfer_id = %id, error = s.message(), "file stream could not be opened");
            arm_expiry(inner, id, &u);
            return Outcome::Interrupted;
        }
    };
    let max = inner.cfg.max_file_size;
    let mut last_ack = offset;
    let result = loop {
        let msg = match down.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                forget(inner, id, &u);
                discard(inner, &u).await;
                return Outcome::Cancelled;
            }
            Err(s) => {
                tracing::info!(event = "file.write_interrupted", transfer_id = %id, error = s.message(), "write stream broke; parked for resume");
                arm_expiry(inner, id, &u);
                return Outcome::Interrupted;
            }
        };
        let slot = u.slot.clone();
        match msg.msg {
            Some(file_down::Msg::Data(d)) => {
                let r = inner
                    .worker
                    .run(move || {
                        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
                        match &mut *g {
                            Slot::Active(w) => {
                                w.data(d.offset, &d.data, max).map(|n| (n, w.accepted))
                            }
                            _ => Err(FileError::new(
                                ErrorCode::Unavailable,
                                "the write was aborted",
                            )),
                        }
                    })
                    .await
                    .and_then(|r| r);
                match r {
                    Ok((n, accepted)) => {
                        inner.telemetry.metrics.file_bytes("up", n);
                        if accepted - last_ack >= ACK_EVERY {
                            last_ack = accepted;
                            let _ = tx
                                .send(up(file_up::Msg::Ack(proto::FileAck { offset: accepted })))
                                .await;
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
            Some(file_down::Msg::End(end)) => {
                let r = inner
                    .worker
                    .run(move || {
                        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
                        match &mut *g {
                            Slot::Active(w) => match w.finish(end.size) {
                                Ok(res) => {
                                    *g = Slot::Done(res.clone());
                                    Ok(res)
                                }
                                Err(e) => Err(e),
                            },
                            Slot::Done(r) => Ok(r.clone()),
                            Slot::Gone => Err(FileError::new(
                                ErrorCode::Unavailable,
                                "the write was aborted",
                            )),
                        }
                    })
                    .await
                    .and_then(|r| r);
                break r;
            }
            None => {
                break Err(FileError::new(
                    ErrorCode::InvalidArgument,
                    "empty FileDown frame",
                ));
            }
        }
    };
    match &result {
        Ok(r) => {
            let _ = tx.send(up(file_up::Msg::Result(r.clone()))).await;
            tracing::info!(event = "file.written", transfer_id = %id, path = %req.path, bytes = r.bytes, "write finished");
            arm_expiry(inner, id, &u);
        }
        Err(e) => {
            // Removed before the error is sent: once the gateway hears it, nothing is left.
            forget(inner, id, &u);
            discard(inner, &u).await;
            let _ = tx.send(error_frame(e)).await;
        }
    }
    drop(tx);
    linger(&mut down).await;
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Failed(e),
    }
}
