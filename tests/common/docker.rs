//! Harness for the container tests (tests/docker.rs): the Docker engine (the `docker`
//! CLI) and per-test Docker resources (a network, named volumes, containers) that a Drop
//! guard removes even when the test fails. The static release binary and the example
//! image built from it are in `docker/image.rs`; a test's cluster (the gateway on the
//! network, pods as containers) in `docker/cluster.rs`.
//!
//! Cost control: the binary is built at most once per test process by
//! `scripts/build-static.sh`, and only when `dist/sandbox-supervisor` is older than the
//! sources (or `SSV_STATIC_BINARY` names a prebuilt one); the image is built once per test
//! process and removed when the process exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

mod cluster;
mod image;

pub use cluster::*;
pub use image::{example_image, static_binary};

/// Every container, volume and network a test creates carries this label with the
/// creating process's pid, so a later run can remove what a killed run left behind.
pub const LABEL: &str = "ssv-test.pid";
/// The name the gateway's certificate carries; containers dial the network's gateway IP
/// and verify this name (`SANDBOX_SUPERVISOR_GATEWAY_SERVER_NAME`).
pub const GATEWAY_NAME: &str = "gateway.sandbox-system.svc";
/// Release grace the containers run with: long enough to see TERM handled, short enough
/// for CI.
pub const RELEASE_GRACE_S: u64 = 3;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Why the container tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if std::env::var_os("SSV_SKIP_DOCKER").is_some() {
        return Some("SSV_SKIP_DOCKER is set".into());
    }
    if !super::is_root() {
        return Some("needs root (the Docker socket, root-owned bind mounts)".into());
    }
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Some(format!("no docker client: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "no Docker engine: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// Runs `docker args…`; stdout (trimmed) on success, an error naming the command and its
/// stderr otherwise.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `docker` off the async worker threads (stop, kill and network changes can take seconds).
pub async fn docker_async(args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Docker resources created by one test, removed on drop (containers first).
pub struct Scope {
    pub id: String,
    containers: Mutex<Vec<String>>,
    volumes: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
}

impl Scope {
    pub fn new() -> Scope {
        Scope {
            id: format!(
                "ssv-test-{}-{:06x}",
                std::process::id(),
                rand::random::<u32>() >> 8
            ),
            containers: Mutex::default(),
            volumes: Mutex::default(),
            networks: Mutex::default(),
        }
    }

    pub fn label(&self) -> String {
        format!("{LABEL}={}", std::process::id())
    }

    pub fn network(&self) -> Result<String, String> {
        let name = self.id.clone();
        docker(&["network", "create", "--label", &self.label(), &name])?;
        self.networks.lock().unwrap().push(name.clone());
        Ok(name)
    }

    pub fn volume(&self, short: &str) -> Result<String, String> {
        let name = format!("{}-{short}", self.id);
        docker(&["volume", "create", "--label", &self.label(), &name])?;
        self.volumes.lock().unwrap().push(name.clone());
        Ok(name)
    }

    /// Registers a container name for removal (before `docker run`, so a half-started
    /// container is removed too).
    pub fn container(&self, short: &str) -> String {
        let name = format!("{}-{short}", self.id);
        self.containers.lock().unwrap().push(name.clone());
        name
    }
}

impl Default for Scope {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if std::env::var_os("SSV_KEEP").is_some() {
            eprintln!("SSV_KEEP: leaving docker resources {}-*", self.id);
            return;
        }
        let containers = std::mem::take(&mut *self.containers.lock().unwrap());
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(containers.iter().map(String::as_str));
            let _ = Command::new("docker")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for v in std::mem::take(&mut *self.volumes.lock().unwrap()) {
            let _ = docker(&["volume", "rm", "-f", &v]);
        }
        for n in std::mem::take(&mut *self.networks.lock().unwrap()) {
            let _ = docker(&["network", "rm", &n]);
        }
    }
}
