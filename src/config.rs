//! Flags and `SANDBOX_SUPERVISOR_*` environment, validated at boot. Every option of
//! `run` has both; a bad value fails naming the option (exit code 64).

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::envfile;
use crate::telemetry::redact_url;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Parser)]
#[command(
    name = "sandbox-supervisor",
    version,
    about = "PID-1 supervisor for Kubernetes agent sandboxes in warm pools"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the supervisor (the container's entrypoint).
    Run(Box<RunConfig>),
    /// Run the reference gateway and a supervisor here, through the full lifecycle, with
    /// your terminal attached to a session in the sandbox.
    Local(LocalArgs),
    /// Exec-probe helper: query /livez or /readyz of a running supervisor.
    Probe(ProbeArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON lines, or text when stderr is a terminal.
    Auto,
    Json,
    Text,
}

/// A later flag overrides an earlier one, so wrappers can append overrides.
#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct RunConfig {
    /// Volume root holding workspace/ and .supervisor/.
    #[arg(long, env = "SANDBOX_SUPERVISOR_VOLUME", default_value = "/sandbox")]
    pub volume: PathBuf,

    /// Seed the workspace from this directory (baked into the image).
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_DIR", default_value = "/opt/sandbox/seed", conflicts_with_all = ["seed_archive", "seed_url"])]
    pub seed_dir: PathBuf,
    /// Seed from a tar archive (plain, gzip or zstd).
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_ARCHIVE")]
    pub seed_archive: Option<PathBuf>,
    /// Seed from an HTTPS URL (a tar archive); requires --seed-sha256.
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_URL", requires = "seed_sha256")]
    pub seed_url: Option<String>,
    /// SHA-256 (hex) the downloaded seed archive must have.
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_SHA256")]
    pub seed_sha256: Option<String>,
    /// CA bundle for --seed-url (default: public web PKI roots).
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_CA")]
    pub seed_ca: Option<PathBuf>,
    /// Give up on --seed-url when the TCP/TLS connection is not up within this long.
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub seed_connect_timeout: Duration,
    /// Give up on --seed-url when no byte arrives for this long (a stalled server).
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub seed_idle_timeout: Duration,
    /// Give up on --seed-url when the whole download takes longer than this.
    #[arg(long, env = "SANDBOX_SUPERVISOR_SEED_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub seed_timeout: Duration,

    /// Gateway endpoint (https://host:port; http:// needs --allow-plaintext).
    #[arg(long, env = "SANDBOX_SUPERVISOR_GATEWAY")]
    pub gateway: String,
    /// CA bundle (PEM) to trust for the gateway; nothing else is trusted.
    #[arg(long, env = "SANDBOX_SUPERVISOR_GATEWAY_CA")]
    pub gateway_ca: Option<PathBuf>,
    /// TLS server name to verify instead of the endpoint's host.
    #[arg(long, env = "SANDBOX_SUPERVISOR_GATEWAY_SERVER_NAME")]
    pub gateway_server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "SANDBOX_SUPERVISOR_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "SANDBOX_SUPERVISOR_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Allow an http:// gateway (no TLS). Logged as a warning.
    #[arg(long, env = "SANDBOX_SUPERVISOR_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,

    /// Projected ServiceAccount token (re-read on every use).
    #[arg(
        long,
        env = "SANDBOX_SUPERVISOR_TOKEN_PATH",
        default_value = "/var/run/secrets/sandbox-gateway/token"
    )]
    pub token_path: PathBuf,
    /// Audience the projected token must carry; checked locally before it is presented,
    /// for a precise error on a misconfigured volume (empty: not checked).
    #[arg(long, env = "SANDBOX_SUPERVISOR_AUDIENCE", default_value = "")]
    pub audience: String,
    /// Pod name (downward API metadata.name).
    #[arg(long, env = "SANDBOX_SUPERVISOR_POD_NAME", default_value = "")]
    pub pod_name: String,
    /// Pod namespace (downward API metadata.namespace).
    #[arg(long, env = "SANDBOX_SUPERVISOR_POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    /// Pod UID (downward API metadata.uid); activations must name it.
    #[arg(long, env = "SANDBOX_SUPERVISOR_POD_UID", default_value = "")]
    pub pod_uid: String,
    /// Downward-API annotations file watched for the claim hint.
    #[arg(
        long,
        env = "SANDBOX_SUPERVISOR_ANNOTATIONS_PATH",
        default_value = "/etc/podinfo/annotations"
    )]
    pub annotations_path: PathBuf,
    /// Annotation key whose appearance means a claim adopted the pod.
    #[arg(
        long,
        env = "SANDBOX_SUPERVISOR_CLAIM_ANNOTATION",
        default_value = "agents.x-k8s.io/claim-uid"
    )]
    pub claim_annotation: String,

    /// User sessions run as by default (name or uid).
    #[arg(
        long,
        env = "SANDBOX_SUPERVISOR_SANDBOX_USER",
        default_value = "sandbox"
    )]
    pub sandbox_user: String,
    /// Let sessions ask to run as root.
    #[arg(long, env = "SANDBOX_SUPERVISOR_ALLOW_ROOT_SESSIONS")]
    pub allow_root_sessions: bool,
    /// passwd file for user lookups.
    #[arg(
        long,
        env = "SANDBOX_SUPERVISOR_PASSWD",
        default_value = "/etc/passwd",
        hide = true
    )]
    pub passwd: PathBuf,
    /// Maximum sessions open at once (running or not yet forgotten).
    #[arg(long, env = "SANDBOX_SUPERVISOR_MAX_SESSIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sessions: u32,
    /// Async worker threads. One measured faster here (fewer cross-thread wake-ups on
    /// the exec and streaming paths) and leaves the other cores to the workload.
    #[arg(long, env = "SANDBOX_SUPERVISOR_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,
    /// Unacknowledged output held per stream before the process is paused (bytes; K/M suffixes).
    #[arg(long, env = "SANDBOX_SUPERVISOR_SESSION_BUFFER", default_value = "4M", value_parser = parse_bytes)]
    pub session_buffer: usize,
    /// Unacknowledged output held across all sessions (bytes allocated; K/M/G
    /// suffixes). Past it every session that writes more is paused until the gateway
    /// acknowledges, so many sessions cannot grow the supervisor without bound.
    #[arg(long, env = "SANDBOX_SUPERVISOR_OUTPUT_BUDGET", default_value = "64M", value_parser = parse_bytes)]
    pub output_budget: usize,
    /// How long a session's process may take from its start to `execve` before it is
    /// killed and the session fails (a tenant can SIGSTOP it in between).
    #[arg(long, env = "SANDBOX_SUPERVISOR_SPAWN_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub spawn_timeout: Duration,
    /// Processes (and threads) the sandbox user may run at once, as its RLIMIT_NPROC:
    /// "auto" keeps 32 of the container's pids limit for the supervisor (no cap when
    /// there is no pids limit), 0 sets no cap.
    #[arg(long, env = "SANDBOX_SUPERVISOR_MAX_WORKLOAD_PROCESSES", default_value = "auto", value_parser = parse_process_cap)]
    pub max_workload_processes: ProcessCap,
    /// oom_score_adj of session processes (-1000..1000): high, so the OOM killer takes
    /// the workload before PID 1. The supervisor itself takes the lowest it may set.
    #[arg(long, env = "SANDBOX_SUPERVISOR_SESSION_OOM_SCORE_ADJ", default_value_t = 1000, value_parser = clap::value_parser!(i32).range(-1000..=1000), allow_negative_numbers = true)]
    pub session_oom_score_adj: i32,
    /// How long output is drained after a session's leader exits.
    #[arg(long, env = "SANDBOX_SUPERVISOR_DRAIN_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Default grace between SIGTERM and SIGKILL for session timeouts.
    #[arg(long, env = "SANDBOX_SUPERVISOR_KILL_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub kill_grace: Duration,
    /// Grace between SIGTERM and SIGKILL of the workload at release.
    #[arg(long, env = "SANDBOX_SUPERVISOR_RELEASE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub release_grace: Duration,

    // --- port forwards (src/ports) ---
    /// Non-loopback addresses port forwards may reach, comma-separated: CIDRs
    /// (10.0.0.0/8), IPs (10.1.2.3) or ip:port (10.1.2.3:5432). Loopback is always
    /// allowed; the default allows nothing else.
    #[arg(long, env = "SANDBOX_SUPERVISOR_FORWARD_ALLOW", default_value = "", value_parser = crate::ports::parse_allow)]
    pub forward_allow: crate::ports::AllowList,
    /// How long a port forward's TCP connect may take before it fails (UNAVAILABLE).
    #[arg(long, env = "SANDBOX_SUPERVISOR_FORWARD_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub forward_connect_timeout: Duration,
    /// Port forwards open at once; past it a new one is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "SANDBOX_SUPERVISOR_MAX_FORWARDS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_forwards: u32,
    // --- end port forwards ---
    /// Address for /livez, /readyz and /metrics ("off" to disable).
    #[arg(long, env = "SANDBOX_SUPERVISOR_LISTEN_PROBES", default_value = "0.0.0.0:9090", value_parser = parse_listen)]
    pub listen_probes: ProbeListen,
    /// Log format.
    #[arg(long, env = "SANDBOX_SUPERVISOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    /// Log filter: a level ("info", "debug") or `target=level` directives separated by
    /// commas, with an optional default level first ("info,h2=debug").
    #[arg(long, env = "SANDBOX_SUPERVISOR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    // ── file streams (issue #14) ──
    /// Absolute directories file operations may name besides the workspace
    /// (comma-separated, e.g. "/tmp"). Default: none, only workspace-relative paths.
    #[arg(long, env = "SANDBOX_SUPERVISOR_FILE_ROOTS", value_delimiter = ',')]
    pub file_roots: Vec<PathBuf>,
    /// How long an interrupted write waits for its gateway to resume it (and a finished
    /// one's result is remembered) before its temporary file is removed.
    #[arg(long, env = "SANDBOX_SUPERVISOR_FILE_RESUME_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub file_resume_window: Duration,
    /// Largest file a write may create (bytes; K/M/G suffixes).
    #[arg(long, env = "SANDBOX_SUPERVISOR_MAX_FILE_SIZE", default_value = "16G", value_parser = parse_file_size)]
    pub max_file_size: u64,
    /// File operations running at once; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "SANDBOX_SUPERVISOR_MAX_FILE_OPERATIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_file_operations: u32,
}

#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Seed the workspace from this directory (default: a small demo seed).
    #[arg(long)]
    pub seed_dir: Option<PathBuf>,
    /// Log level of the supervisor and gateway.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// Run over plaintext HTTP/2 instead of TLS.
    #[arg(long)]
    pub plaintext: bool,
    /// Keep the temporary volume and logs for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Make the sandbox's TCP port PORT reachable on 127.0.0.1:LOCALPORT of this
    /// machine (default: the same port) while the command runs. Repeatable.
    #[arg(long = "forward", value_name = "PORT[:LOCALPORT]", value_parser = parse_local_forward)]
    pub forward: Vec<LocalForward>,
    /// Before the command: copy SRC (a file or directory here) to DST in the workspace
    /// (a directory's contents are extracted below DST). Repeatable.
    #[arg(long = "upload", value_name = "SRC:DST", value_parser = parse_upload)]
    pub upload: Vec<LocalTransfer>,
    /// After the command, before the release: copy SRC (a file or directory in the
    /// workspace) to DST here. Repeatable.
    #[arg(long = "download", value_name = "SRC:DST", value_parser = parse_download)]
    pub download: Vec<LocalTransfer>,
    /// The command to run in the sandbox (default: an interactive shell).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `local --upload`/`--download`: a path on this machine and one in the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTransfer {
    pub local: PathBuf,
    pub remote: String,
}

/// Splits `SRC:DST` at the first `:` (so a workspace path may contain one, a local
/// source may not).
fn split_transfer(s: &str, flag: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!(
            "'{s}' is not SRC:DST: give e.g. {flag} ./project:project (both sides non-empty)"
        )),
    }
}

fn parse_upload(s: &str) -> Result<LocalTransfer, String> {
    let (local, remote) = split_transfer(s, "--upload")?;
    Ok(LocalTransfer {
        local: local.into(),
        remote,
    })
}

fn parse_download(s: &str) -> Result<LocalTransfer, String> {
    let (remote, local) = split_transfer(s, "--download")?;
    Ok(LocalTransfer {
        local: local.into(),
        remote,
    })
}

/// `local --forward PORT[:LOCALPORT]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalForward {
    pub port: u16,
    pub local: u16,
}

fn parse_local_forward(s: &str) -> Result<LocalForward, String> {
    let bad =
        || format!("'{s}' is not PORT[:LOCALPORT]: give e.g. 8000 or 8000:18000 (ports 1..=65535)");
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
    match s.split_once(':') {
        None => port(s)
            .map(|p| LocalForward { port: p, local: p })
            .ok_or_else(bad),
        Some((a, b)) => match (port(a), port(b)) {
            (Some(port), Some(local)) => Ok(LocalForward { port, local }),
            _ => Err(bad()),
        },
    }
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Which probe.
    #[arg(value_enum)]
    pub which: ProbeKind,
    /// The supervisor's probe address.
    #[arg(
        long,
        env = "SANDBOX_SUPERVISOR_PROBE_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub addr: SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProbeKind {
    Live,
    Ready,
}

/// Durations like `500ms`, `10s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: use e.g. 500ms, 10s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit '{unit}': use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=7.0 * 86400.0).contains(&secs) {
        return Err(format!("'{s}' is out of range (0 to 7 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Sizes like `4M`, `512K`, `65536`.
/// `--max-workload-processes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessCap {
    /// From the container's pids limit, less the supervisor's reserve.
    Auto,
    /// No cap (0).
    None,
    Limit(u64),
}

pub fn parse_process_cap(s: &str) -> Result<ProcessCap, String> {
    match s.trim() {
        "auto" => Ok(ProcessCap::Auto),
        "0" => Ok(ProcessCap::None),
        n => n
            .parse::<u64>()
            .map(ProcessCap::Limit)
            .map_err(|_| format!("'{s}' is not a process count: use auto, 0 (no cap) or a number")),
    }
}

/// A file size limit: a byte count with an optional K/M/G/T suffix, at least 1.
pub fn parse_file_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use e.g. 1048576, 512M, 16G"))?;
    match n.checked_mul(1u64 << shift) {
        Some(0) => Err(format!("'{s}' is zero: give a size of at least 1 byte")),
        Some(v) => Ok(v),
        None => Err(format!("'{s}' is too large")),
    }
}

pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1024 * 1024),
        Some('G' | 'g') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use e.g. 65536, 512K, 4M"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if !(4096..=(1usize << 30)).contains(&v) {
        return Err(format!("'{s}' is out of range (4K to 1G)"));
    }
    Ok(v)
}

/// Where probes listen; `None` = disabled. A newtype because clap reads an `Option`
/// field as "optional value" rather than as the parser's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeListen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<ProbeListen, String> {
    if s == "off" || s.is_empty() {
        return Ok(ProbeListen(None));
    }
    s.parse()
        .map(|a| ProbeListen(Some(a)))
        .map_err(|_| format!("'{s}' is not an address: use host:port like 0.0.0.0:9090, or off"))
}

/// Problems clap cannot see: combinations and files.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--gateway {0:?}: must be an https:// URL (or http:// with --allow-plaintext)")]
    GatewayScheme(String),
    #[error("--gateway {0:?} is http:// but --allow-plaintext is not set: plaintext sends tokens unencrypted")]
    PlaintextNotAllowed(String),
    #[error("--seed-sha256 {0:?}: must be 64 hex digits")]
    SeedDigest(String),
    #[error("--seed-url {0:?}: must be an https:// URL (plain http:// only to a loopback host)")]
    SeedUrl(String),
    #[error("--{0} must be more than 0")]
    ZeroTimeout(&'static str),
    #[error("--{option} {path}: {why}")]
    File {
        option: &'static str,
        path: String,
        why: String,
    },
}

impl RunConfig {
    /// Checks what clap cannot; called once at boot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(rest) = self.gateway.strip_prefix("http://") {
            if !self.allow_plaintext {
                return Err(ConfigError::PlaintextNotAllowed(redact_url(&self.gateway)));
            }
            if rest.is_empty() {
                return Err(ConfigError::GatewayScheme(redact_url(&self.gateway)));
            }
        } else if !self.gateway.starts_with("https://") || self.gateway.len() <= "https://".len() {
            return Err(ConfigError::GatewayScheme(redact_url(&self.gateway)));
        }
        if let Some(d) = &self.seed_sha256 {
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::SeedDigest(d.clone()));
            }
        }
        if let Some(u) = &self.seed_url {
            // Plain http only to loopback (local test servers), as the download enforces.
            let ok = reqwest::Url::parse(u).is_ok_and(|url| match url.scheme() {
                "https" => true,
                "http" => url.host_str().is_some_and(|h| {
                    h.eq_ignore_ascii_case("localhost")
                        || h.trim_start_matches('[')
                            .trim_end_matches(']')
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }),
                _ => false,
            });
            if !ok {
                return Err(ConfigError::SeedUrl(redact_url(u)));
            }
            for (option, d) in [
                ("seed-connect-timeout", self.seed_connect_timeout),
                ("seed-idle-timeout", self.seed_idle_timeout),
                ("seed-timeout", self.seed_timeout),
            ] {
                if d.is_zero() {
                    return Err(ConfigError::ZeroTimeout(option));
                }
            }
        }
        // Files are checked with `stat` only (never opened here: a FIFO would block);
        // each is checked again on its opened fd when it is read (crate::envfile).
        const PEM: Option<u64> = Some(1024 * 1024);
        let required = [
            ("gateway-ca", self.gateway_ca.as_ref(), PEM),
            ("client-cert", self.client_cert.as_ref(), PEM),
            ("client-key", self.client_key.as_ref(), PEM),
            ("seed-ca", self.seed_ca.as_ref(), PEM),
            ("seed-archive", self.seed_archive.as_ref(), None),
        ];
        // These may legitimately appear later (a volume mounted after start) or be
        // absent (a numeric --sandbox-user needs no passwd): only what is there is checked.
        let if_present = [
            (
                "token-path",
                Some(&self.token_path),
                Some(crate::identity::MAX_TOKEN_BYTES),
            ),
            (
                "passwd",
                Some(&self.passwd),
                Some(crate::exec::MAX_PASSWD_BYTES),
            ),
        ];
        for (option, path, limit, must_exist) in required
            .into_iter()
            .map(|(o, p, l)| (o, p, l, true))
            .chain(if_present.into_iter().map(|(o, p, l)| (o, p, l, false)))
        {
            let Some(p) = path else { continue };
            match envfile::check(p, "file", limit) {
                Ok(()) => {}
                Err(e) if e.is_missing() && !must_exist => {}
                Err(e) => {
                    return Err(ConfigError::File {
                        option,
                        path: p.display().to_string(),
                        why: e.problem(),
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_bytes("4M").unwrap(), 4 << 20);
        assert!(parse_bytes("12").is_err());
    }

    #[test]
    fn bad_values_name_the_option() {
        let err = Cli::try_parse_from([
            "s",
            "run",
            "--gateway",
            "https://g",
            "--release-grace",
            "soon",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--release-grace"), "{err}");
        let Command::Run(cfg) = Cli::try_parse_from(["s", "run", "--gateway", "http://g:1"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--allow-plaintext"));
    }
}
