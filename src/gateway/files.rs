//! The gateway's file driver: write, read, stat, list, mkdir, remove, rename on a
//! sandbox through File streams (docs/PROTOCOL.md §12). Writes and reads resume across
//! relay drops on their own: a write re-sends `OpenFile` with the same transfer id and
//! resends from `FileAttach.offset`; a read re-opens from the bytes it holds and checks
//! the whole file's SHA-256 at the end.

use super::channels::{Attached, Opened};
use super::driver::{short_id, ExecError};
use super::sandbox::Sandbox;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::proto::{self, file_down, file_up, open_file::Op, ErrorCode, FileDown, FileUp};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

/// Size of the data frames a write sends.
const WRITE_FRAME: usize = 256 * 1024;
/// How long a write or read keeps retrying after a relay drop before it gives up.
const RESUME_FOR: Duration = Duration::from_secs(60);

/// Options of [`Sandbox::write_file`].
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// 0 = 0644.
    pub mode: u32,
    pub create_parents: bool,
    pub replace: bool,
    /// Hex SHA-256 the content must have (checked by the supervisor before the rename).
    pub expect_sha256: Option<String>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ExecError {
    ExecError {
        code,
        message: message.into(),
    }
}

fn from_proto(e: proto::Error) -> ExecError {
    ExecError {
        code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
        message: e.message,
    }
}

/// Why one attempt ended without an answer.
enum Attempt<T> {
    Done(Result<T, ExecError>),
    /// The stream or the relay broke: try again.
    Retry(String),
}

impl Sandbox {
    async fn open_file(
        &self,
        id: &str,
        op: Op,
    ) -> Result<(Opened<FileUp, FileDown>, proto::FileAttach), ExecError> {
        let open = GwMsg::OpenFile(proto::OpenFile {
            transfer_id: id.to_owned(),
            op: Some(op),
        });
        match self.open_channel(id, open).await? {
            Attached::File(o, a) => Ok((o, a)),
            Attached::Forward(_) => Err(err(
                ErrorCode::Internal,
                "a forward stream answered a file request",
            )),
        }
    }

    /// Runs `attempt` until it answers, retrying while the relay is down (UNAVAILABLE)
    /// for at most [`RESUME_FOR`] after the last progress.
    async fn with_resume<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, ExecError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ExecError>>,
    {
        let mut since = Instant::now();
        let mut last = String::new();
        loop {
            if since.elapsed() > RESUME_FOR {
                return Err(err(
                    ErrorCode::Unavailable,
                    format!("{what}: gave up after {RESUME_FOR:?} of relay trouble: {last}"),
                ));
            }
            match attempt().await {
                Ok(Attempt::Done(r)) => return r,
                Ok(Attempt::Retry(why)) => {
                    last = why;
                    since = Instant::now();
                }
                Err(e) if e.code == ErrorCode::Unavailable => {
                    last = e.message;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the result of an operation that sends no content.
    async fn simple_op(&self, op: Op) -> Result<proto::FileResult, ExecError> {
        let id = short_id("f");
        let (mut opened, _) = self.open_file(&id, op).await?;
        loop {
            match opened.up.message().await {
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Result(r)),
                })) => return Ok(r),
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Error(e)),
                })) => return Err(from_proto(e)),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(err(
                        ErrorCode::Unavailable,
                        format!("file stream {id} ended without a result"),
                    ))
                }
                Err(s) => {
                    return Err(err(
                        ErrorCode::Unavailable,
                        format!("file stream {id} broke: {}", s.message()),
                    ))
                }
            }
        }
    }

    pub async fn stat(&self, path: &str) -> Result<proto::FileInfo, ExecError> {
        let r = self
            .simple_op(Op::Stat(proto::StatPath { path: path.into() }))
            .await?;
        Ok(r.info.unwrap_or_default())
    }

    /// Every entry of a directory, page by page (`page_size` 0 = the supervisor's 1000).
    pub async fn list(
        &self,
        path: &str,
        page_size: u32,
    ) -> Result<Vec<proto::FileInfo>, ExecError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .simple_op(Op::List(proto::ListDir {
                    path: path.into(),
                    page_token: token.clone(),
                    page_size,
                }))
                .await?;
            all.extend(r.entries);
            if r.next_page_token.is_empty() {
                return Ok(all);
            }
            token = r.next_page_token;
        }
    }

    pub async fn mkdir(
        &self,
        path: &str,
        mode: u32,
        parents: bool,
    ) -> Result<proto::FileInfo, ExecError> {
        let r = self
            .simple_op(Op::Mkdir(proto::MakeDir {
                path: path.into(),
                mode,
                parents,
            }))
            .await?;
        Ok(r.info.unwrap_or_default())
    }

    pub async fn remove(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<proto::FileResult, ExecError> {
        self.simple_op(Op::Remove(proto::RemovePath {
            path: path.into(),
            recursive,
        }))
        .await
    }

    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        replace: bool,
    ) -> Result<proto::FileInfo, ExecError> {
        let r = self
            .simple_op(Op::Rename(proto::RenamePath {
                from: from.into(),
                to: to.into(),
                replace,
            }))
            .await?;
        Ok(r.info.unwrap_or_default())
    }

    /// Writes `data` to `path` atomically; resumes across relay drops from the offset
    /// the supervisor accepted.
    pub async fn write_file(
        &self,
        path: &str,
        data: impl Into<Bytes>,
        opts: WriteOptions,
    ) -> Result<proto::FileResult, ExecError> {
        let data: Bytes = data.into();
        let id = short_id("w");
        let req = proto::WriteFile {
            path: path.into(),
            mode: opts.mode,
            create_parents: opts.create_parents,
            replace: opts.replace,
            expect_sha256: opts.expect_sha256.clone().unwrap_or_default(),
            size: Some(data.len() as u64),
        };
        let what = format!("write {path}");
        self.with_resume(&what, || self.write_attempt(&id, &req, &data))
            .await
    }

    async fn write_attempt(
        &self,
        id: &str,
        req: &proto::WriteFile,
        data: &Bytes,
    ) -> Result<Attempt<proto::FileResult>, ExecError> {
        let (mut opened, attach) = self.open_file(id, Op::Write(req.clone())).await?;
        let mut next = (attach.offset as usize).min(data.len());
        let mut ended = false;
        loop {
            tokio::select! {
                biased;
                msg = opened.up.message() => match msg {
                    Ok(Some(FileUp { msg: Some(file_up::Msg::Result(r)) })) => return Ok(Attempt::Done(Ok(r))),
                    Ok(Some(FileUp { msg: Some(file_up::Msg::Error(e)) })) => return Ok(Attempt::Done(Err(from_proto(e)))),
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(Attempt::Retry("the file stream ended without a result".into())),
                    Err(s) => return Ok(Attempt::Retry(format!("the file stream broke: {}", s.message()))),
                },
                permit = opened.down.reserve(), if !ended => {
                    let Ok(permit) = permit else {
                        return Ok(Attempt::Retry("the file stream closed".into()));
                    };
                    if next < data.len() {
                        let end = (next + WRITE_FRAME).min(data.len());
                        permit.send(Ok(FileDown { msg: Some(file_down::Msg::Data(proto::FileData {
                            offset: next as u64,
                            data: data.slice(next..end),
                        })) }));
                        next = end;
                    } else {
                        permit.send(Ok(FileDown { msg: Some(file_down::Msg::End(proto::FileEnd { size: data.len() as u64 })) }));
                        ended = true;
                    }
                }
            }
        }
    }

    /// Reads the whole file at `path` into memory; see [`Sandbox::read_file_to`].
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, ExecError> {
        let mut bytes = Vec::new();
        self.read_file_to(path, &mut bytes).await?;
        Ok(bytes)
    }

    /// Streams the file at `path` into `sink` as frames arrive (nothing is held here:
    /// a download of any size into a local file costs a frame of memory). Resumes
    /// across relay drops from the bytes already written, and verifies the SHA-256 the
    /// supervisor computed over the whole file; on a mismatch the sink holds bytes that
    /// must be thrown away. `sink` is written from the runtime: a local file or memory,
    /// not something that blocks for long. Returns the bytes written.
    pub async fn read_file_to(
        &self,
        path: &str,
        sink: &mut impl std::io::Write,
    ) -> Result<u64, ExecError> {
        let what = format!("read {path}");
        // Hashed as frames arrive, so the check at the end costs no second pass.
        let mut got = Received {
            written: 0,
            hasher: Sha256::new(),
            sink,
        };
        let mut since = Instant::now();
        let sha = loop {
            if since.elapsed() > RESUME_FOR {
                return Err(err(
                    ErrorCode::Unavailable,
                    format!("{what}: gave up after {RESUME_FOR:?} of relay trouble"),
                ));
            }
            let before = got.written;
            let r = self.read_attempt_into(path, &mut got).await;
            let progressed = got.written > before;
            match r {
                Ok(Attempt::Done(Ok(digest))) => break digest,
                Ok(Attempt::Done(Err(e))) => return Err(e),
                Ok(Attempt::Retry(_)) => {
                    if progressed {
                        since = Instant::now();
                    }
                }
                Err(e) if e.code == ErrorCode::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let local = hex::encode(got.hasher.finalize());
        if local != sha {
            return Err(err(
                ErrorCode::Internal,
                format!(
                    "{what}: received {} bytes with SHA-256 {local}, the supervisor reports {sha}",
                    got.written
                ),
            ));
        }
        got.sink.flush().map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("{what}: flushing the local copy: {e}"),
            )
        })?;
        Ok(got.written)
    }

    async fn read_attempt_into(
        &self,
        path: &str,
        got: &mut Received<'_, impl std::io::Write>,
    ) -> Result<Attempt<String>, ExecError> {
        let id = short_id("r");
        // Frames must continue exactly where the sink stands (the offset asked for).
        let (mut opened, _) = self
            .open_file(
                &id,
                Op::Read(proto::ReadFile {
                    path: path.into(),
                    offset: got.written,
                    length: 0,
                }),
            )
            .await?;
        loop {
            match opened.up.message().await {
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Data(d)),
                })) => {
                    if d.offset != got.written {
                        return Ok(Attempt::Done(Err(err(
                            ErrorCode::Internal,
                            format!(
                                "read {path}: data at offset {} where {} was expected",
                                d.offset, got.written
                            ),
                        ))));
                    }
                    if let Err(e) = got.sink.write_all(&d.data) {
                        return Ok(Attempt::Done(Err(err(
                            ErrorCode::Internal,
                            format!(
                                "read {path}: writing the local copy at byte {}: {e}",
                                got.written
                            ),
                        ))));
                    }
                    got.hasher.update(&d.data);
                    got.written += d.data.len() as u64;
                }
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Result(r)),
                })) => return Ok(Attempt::Done(Ok(r.sha256))),
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Error(e)),
                })) => return Ok(Attempt::Done(Err(from_proto(e)))),
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Ok(Attempt::Retry(
                        "the file stream ended without a result".into(),
                    ))
                }
                Err(s) => {
                    return Ok(Attempt::Retry(format!(
                        "the file stream broke: {}",
                        s.message()
                    )))
                }
            }
        }
    }

    /// Uploads `archive` (a tar, plain, gzip or zstd) to be extracted below `dir`. Not
    /// resumable: a broken stream fails with UNAVAILABLE and nothing is put in place.
    pub async fn upload_tar(
        &self,
        dir: &str,
        archive: impl Into<Bytes>,
        create_parents: bool,
    ) -> Result<proto::FileResult, ExecError> {
        let data: Bytes = archive.into();
        let id = short_id("x");
        let op = Op::Extract(proto::ExtractArchive {
            path: dir.into(),
            compression: proto::Compression::Unspecified as i32,
            create_parents,
        });
        let (mut opened, _) = self.open_file(&id, op).await?;
        let mut next = 0usize;
        let mut ended = false;
        loop {
            tokio::select! {
                biased;
                msg = opened.up.message() => match msg {
                    Ok(Some(FileUp { msg: Some(file_up::Msg::Result(r)) })) => return Ok(r),
                    Ok(Some(FileUp { msg: Some(file_up::Msg::Error(e)) })) => return Err(from_proto(e)),
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(err(ErrorCode::Unavailable, format!("upload to {dir}: the stream ended without a result"))),
                    Err(s) => return Err(err(ErrorCode::Unavailable, format!("upload to {dir}: the stream broke: {}", s.message()))),
                },
                permit = opened.down.reserve(), if !ended => {
                    let Ok(permit) = permit else {
                        return Err(err(ErrorCode::Unavailable, format!("upload to {dir}: the stream closed")));
                    };
                    if next < data.len() {
                        let end = (next + WRITE_FRAME).min(data.len());
                        permit.send(Ok(FileDown { msg: Some(file_down::Msg::Data(proto::FileData { offset: next as u64, data: data.slice(next..end) })) }));
                        next = end;
                    } else {
                        permit.send(Ok(FileDown { msg: Some(file_down::Msg::End(proto::FileEnd { size: data.len() as u64 })) }));
                        ended = true;
                    }
                }
            }
        }
    }

    /// Downloads `dir` as a plain tar stream; checks the stream's SHA-256.
    pub async fn download_tar(&self, dir: &str) -> Result<Vec<u8>, ExecError> {
        let id = short_id("a");
        let op = Op::Archive(proto::ArchiveDir {
            path: dir.into(),
            compression: proto::Compression::None as i32,
        });
        let (mut opened, _) = self.open_file(&id, op).await?;
        let mut out = Vec::new();
        loop {
            match opened.up.message().await {
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Data(d)),
                })) => out.extend_from_slice(&d.data),
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Result(r)),
                })) => {
                    let local = hex::encode(Sha256::digest(&out));
                    if local != r.sha256 {
                        return Err(err(
                            ErrorCode::Internal,
                            format!(
                                "download of {dir}: SHA-256 {local}, the supervisor reports {}",
                                r.sha256
                            ),
                        ));
                    }
                    return Ok(out);
                }
                Ok(Some(FileUp {
                    msg: Some(file_up::Msg::Error(e)),
                })) => return Err(from_proto(e)),
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(err(
                        ErrorCode::Unavailable,
                        format!("download of {dir}: the stream ended without a result"),
                    ))
                }
                Err(s) => {
                    return Err(err(
                        ErrorCode::Unavailable,
                        format!("download of {dir}: the stream broke: {}", s.message()),
                    ))
                }
            }
        }
    }
}

/// Where a download stands: bytes written to the sink and their running digest.
struct Received<'a, W> {
    written: u64,
    hasher: Sha256,
    sink: &'a mut W,
}
