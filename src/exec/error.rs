//! Precise, actionable errors for exec requests. Each maps to one protocol code.

use crate::proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty: give at least the program to run")]
    EmptyArgv,
    #[error("argv[{index}] contains a NUL byte")]
    NulInArgument { index: usize },
    #[error("environment variable {name:?} is invalid: names must be non-empty without '=' or NUL, values without NUL")]
    BadEnv { name: String },
    #[error("executable '{name}' not found in PATH={path}")]
    NotFound { name: String, path: String },
    #[error("'{path}' is not executable ({why})")]
    NotExecutable { path: String, why: String },
    #[error("working directory '{cwd}' {why}")]
    BadCwd { cwd: String, why: String },
    #[error("unknown user '{user}': no such name or uid in /etc/passwd")]
    UnknownUser { user: String },
    #[error(
        "sessions may not run as root here (user '{user}'); set --allow-root-sessions to permit it"
    )]
    RootNotAllowed { user: String },
    #[error(
        "cannot run as '{user}': the supervisor is not root, so sessions run as uid {own_uid}"
    )]
    CannotSwitchUser { user: String, own_uid: u32 },
    #[error("terminal size {cols}x{rows} is invalid: both must be between 1 and 65535")]
    BadTtySize { cols: u32, rows: u32 },
    #[error("session id {id:?} is invalid: use 1 to 128 characters of [A-Za-z0-9._:-]")]
    BadSessionId { id: String },
    #[error("session '{id}' already exists; choose a new session id")]
    DuplicateSession { id: String },
    #[error("session limit reached ({limit} sessions open); forget finished sessions or raise --max-sessions")]
    TooManySessions { limit: usize },
    #[error("the sandbox is releasing: no new sessions")]
    Releasing,
    #[error("starting '{program}' failed: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A set-up step in the child before `execve` failed (see `exec::child::Step`);
    /// `source` keeps the errno, which picks the code as for [`ExecError::Spawn`].
    #[error("starting '{program}' failed: {step}: {source}")]
    SpawnStep {
        program: String,
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting '{program}' failed: the process did not reach execve within {bound:?} and was killed (was it stopped, e.g. by SIGSTOP from another session?); retry, or raise --spawn-timeout")]
    SpawnTimeout {
        program: String,
        bound: std::time::Duration,
    },
    #[error("starting '{program}' failed: the sandbox user already runs {limit} processes (--max-workload-processes); end some, or raise the limit")]
    TooManyProcesses { program: String, limit: u64 },
    #[error("setting up the session's {what} failed: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
}

impl ExecError {
    pub fn code(&self) -> ErrorCode {
        use ExecError::*;
        match self {
            EmptyArgv
            | NulInArgument { .. }
            | BadEnv { .. }
            | BadTtySize { .. }
            | BadSessionId { .. } => ErrorCode::InvalidArgument,
            NotFound { .. } | UnknownUser { .. } => ErrorCode::NotFound,
            BadCwd { .. } => ErrorCode::InvalidArgument,
            NotExecutable { .. } | RootNotAllowed { .. } | CannotSwitchUser { .. } => {
                ErrorCode::PermissionDenied
            }
            DuplicateSession { .. } => ErrorCode::AlreadyExists,
            TooManySessions { .. } | TooManyProcesses { .. } => ErrorCode::ResourceExhausted,
            SpawnTimeout { .. } | Releasing => ErrorCode::Unavailable,
            Spawn { source, .. } | SpawnStep { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) => ErrorCode::NotFound,
                Some(libc::EACCES) | Some(libc::EPERM) => ErrorCode::PermissionDenied,
                Some(libc::ENOEXEC) => ErrorCode::FailedPrecondition,
                _ => ErrorCode::Internal,
            },
            Setup { .. } => ErrorCode::Internal,
        }
    }

    pub fn to_proto(&self) -> crate::proto::Error {
        crate::proto::Error {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }
}
