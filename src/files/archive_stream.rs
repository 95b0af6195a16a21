//! The stream side of archive upload and download: frames to and from the worker
//! job in [`super::archive`], which holds one worker thread for the transfer.

use super::*;

pub(super) async fn serve_extract(
    inner: &Arc<Inner>,
    id: &str,
    req: proto::ExtractArchive,
    opener: &Opener,
) -> Outcome {
    let Some((tx, call)) = open_stream(opener, id, 0).await else {
        return Outcome::Interrupted;
    };
    let mut down = match call.await {
        Ok(r) => r.into_inner(),
        Err(_) => return Outcome::Interrupted,
    };
    let (ctx, crx) = mpsc::channel::<archive::Chunk>(16);
    let roots = inner.roots.clone();
    let job = inner
        .worker
        .run(move || archive::extract(&roots, &req, archive::ChunkReader::new(crx)));
    tokio::pin!(job);
    let mut ctx = Some(ctx);
    let mut received = 0u64;
    let result = loop {
        tokio::select! {
            r = &mut job => break r.and_then(|r| r),
            msg = down.message(), if ctx.is_some() => {
                let sender = ctx.as_ref().expect("guarded");
                match msg {
                    Ok(Some(proto::FileDown { msg: Some(file_down::Msg::Data(d)) })) => {
                        if d.offset != received {
                            ctx.take();
                            let _ = (&mut job).await;
                            break Err(FileError::new(ErrorCode::FailedPrecondition, format!(
                                "archive data at offset {} where {received} was expected; an upload cannot resume: start again", d.offset)));
                        }
                        received += d.data.len() as u64;
                        inner.telemetry.metrics.file_bytes("up", d.data.len() as u64);
                        if sender.send(archive::Chunk::Data(d.data)).await.is_err() {
                            ctx = None;
                        }
                    }
                    Ok(Some(proto::FileDown { msg: Some(file_down::Msg::End(end)) })) => {
                        if end.size != received {
                            ctx.take();
                            let _ = (&mut job).await;
                            break Err(FileError::new(ErrorCode::InvalidArgument, format!(
                                "FileEnd.size is {} but {received} archive bytes were sent", end.size)));
                        }
                        let _ = sender.send(archive::Chunk::End).await;
                        ctx = None;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        // Cancelled or broken: the reader fails, the temporary tree goes.
                        ctx.take();
                        let _ = (&mut job).await;
                        return Outcome::Cancelled;
                    }
                }
            }
        }
    };
    let last = match &result {
        Ok(r) => up(file_up::Msg::Result(r.clone())),
        Err(e) => error_frame(e),
    };
    let _ = tx.send(last).await;
    drop(tx);
    linger(&mut down).await;
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Failed(e),
    }
}

pub(super) async fn serve_archive(
    inner: &Arc<Inner>,
    id: &str,
    req: proto::ArchiveDir,
    opener: &Opener,
) -> Outcome {
    let Some((tx, call)) = open_stream(opener, id, 0).await else {
        return Outcome::Interrupted;
    };
    let (cancel_tx, mut cancel_rx) = tokio::sync::oneshot::channel::<DownEnd>();
    let receiver = tokio::spawn(async move {
        let end = match call.await {
            Ok(resp) => {
                let mut down = resp.into_inner();
                loop {
                    match down.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break DownEnd::Closed,
                        Err(s) => break DownEnd::Broken(s.message().to_owned()),
                    }
                }
            }
            Err(s) => DownEnd::Broken(s.message().to_owned()),
        };
        let _ = cancel_tx.send(end);
    });
    let _abort_receiver = AbortOnDrop(receiver.abort_handle());
    let (btx, mut brx) = mpsc::channel::<bytes::Bytes>(8);
    let roots = inner.roots.clone();
    let job = inner
        .worker
        .run(move || archive::archive(&roots, &req, archive::FrameWriter::new(btx)));
    tokio::pin!(job);
    let mut offset = 0u64;
    let mut job_result = None;
    loop {
        tokio::select! {
            r = &mut job, if job_result.is_none() => job_result = Some(r.and_then(|r| r)),
            chunk = brx.recv() => match chunk {
                Some(data) => {
                    let n = data.len() as u64;
                    inner.telemetry.metrics.file_bytes("down", n);
                    let frame = up(file_up::Msg::Data(proto::FileData { offset, data }));
                    offset += n;
                    tokio::select! {
                        r = tx.send(frame) => if r.is_err() { drop(brx); let _ = (&mut job).await; return Outcome::Interrupted },
                        end = &mut cancel_rx => { drop(brx); if job_result.is_none() { let _ = (&mut job).await; } return read_ended(id, end) },
                    }
                }
                None => break,
            },
            end = &mut cancel_rx => { drop(brx); if job_result.is_none() { let _ = (&mut job).await; } return read_ended(id, end) },
        }
    }
    let result = match job_result {
        Some(r) => r,
        None => job.await.and_then(|r| r),
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
