//! The peer baseline: `docker exec` of `/bin/true` into a running container.

use super::TempDir;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Removes the baseline's container and image, also when the bench fails midway.
struct DockerGuard {
    image: String,
    container: Option<String>,
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("no docker client: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `docker exec CONTAINER /bin/true`, `n` times, into a running FROM-scratch container
/// holding only a static busybox (as /bin/true and /bin/sleep). Seconds per call.
pub fn docker_exec(n: usize) -> Result<Vec<f64>, String> {
    docker(&["info", "--format", "{{.ServerVersion}}"])?;
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err("no static busybox at /bin/busybox (apt-get install busybox-static)".into());
    }
    let ctx = TempDir::new("pool-docker");
    std::fs::copy(busybox, ctx.0.join("busybox")).map_err(|e| e.to_string())?;
    std::fs::write(
        ctx.0.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/true\nCOPY busybox /bin/sleep\nCMD [\"/bin/sleep\", \"3600\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let mut guard = DockerGuard {
        image: format!("ssv-bench-true:{}", std::process::id()),
        container: None,
    };
    docker(&[
        "build",
        "-q",
        "-t",
        &guard.image,
        &ctx.0.display().to_string(),
    ])?;
    let label = format!("ssv-test.pid={}", std::process::id());
    let id = docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        &label,
        &guard.image,
    ])?;
    guard.container = Some(id.clone());
    for _ in 0..3 {
        docker(&["exec", &id, "/bin/true"])?; // warm the engine's paths
    }
    let mut v = vec![];
    for _ in 0..n {
        let t = Instant::now();
        docker(&["exec", &id, "/bin/true"])?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(v)
}
