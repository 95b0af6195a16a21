//! One test's world: a Docker network, the reference gateway (TLS) on the network's
//! gateway IP, a kubelet-like issuer, and sandbox pods as containers of the example
//! image; plus an HTTP probe from the host.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_supervisor::gateway::issuer::{LocalIssuer, PodSpec, RotationHandle};
use sandbox_supervisor::gateway::pki::{write_pki, ServerTls, Validity};
use sandbox_supervisor::gateway::{ClaimOptions, GatewayConfig, ReferenceGateway, Sandbox};

use super::super::{TempDir, AUDIENCE};
use super::{docker, example_image, Scope, GATEWAY_NAME, RELEASE_GRACE_S};

/// One test's world: a Docker network, the reference gateway (TLS) listening on the
/// network's gateway IP, a kubelet-like issuer, and the example image.
pub struct Cluster {
    // Field order is drop order: the gateway and token rotations stop before the
    // containers and network go, and the host dirs are removed last.
    pub gateway: ReferenceGateway,
    pub scope: Scope,
    pub issuer: Arc<LocalIssuer>,
    pub image: String,
    pub network: String,
    pub gateway_ip: IpAddr,
    pub ca: PathBuf,
    pub dir: TempDir,
}

/// How a pod addresses the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dial {
    /// The network's gateway IP, verifying the certificate for `GATEWAY_NAME`
    /// (`SANDBOX_SUPERVISOR_GATEWAY_SERVER_NAME`).
    Ip,
    /// `https://GATEWAY_NAME:port`, resolved by the static binary through the
    /// container's /etc/hosts (`--add-host`), as a cluster name would be.
    Name,
}

/// A sandbox pod: one container with its own volume, token dir and podinfo dir.
pub struct Pod {
    pub container: String,
    pub spec: PodSpec,
    pub volume: String,
    pub dir: PathBuf,
    pub rotation: RotationHandle,
}

/// Container state from `docker inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub running: bool,
    pub exit_code: i32,
}

impl Cluster {
    /// Everything a test needs (check `unavailable()` first).
    pub async fn new(tag: &str) -> Result<Cluster, String> {
        // Both may take minutes on a cold target/; never on the async worker threads.
        let image = tokio::task::spawn_blocking(example_image)
            .await
            .map_err(|e| e.to_string())??;
        let scope = Scope::new();
        let network = scope.network()?;
        let gw = docker(&[
            "network",
            "inspect",
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
            &network,
        ])?;
        let gateway_ip: IpAddr = gw
            .parse()
            .map_err(|e| format!("network {network} gateway {gw:?}: {e}"))?;
        let dir = TempDir::new(&format!("docker-{tag}"));
        let issuer = Arc::new(
            LocalIssuer::generate("https://kubernetes.default.svc.cluster.local")
                .map_err(|e| e.to_string())?,
        );
        let (_ca, server, files) =
            write_pki(&dir.0.join("pki"), &[GATEWAY_NAME], Validity::Current)
                .map_err(|e| e.to_string())?;
        let mut cfg = GatewayConfig::for_tests(issuer.public_key_pem());
        // The bridge's address on this host: only containers on this network reach it.
        cfg.listen = SocketAddr::new(gateway_ip, 0);
        cfg.heartbeat_interval = Duration::from_millis(500);
        cfg.tls = Some(ServerTls {
            server,
            client_ca_pem: None,
        });
        let gateway = ReferenceGateway::start(cfg)
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok(Cluster {
            gateway,
            scope,
            issuer,
            image,
            network,
            gateway_ip,
            ca: files.ca_cert,
            dir,
        })
    }

    pub fn gateway_url(&self) -> String {
        format!(
            "https://{}:{}",
            self.gateway_ip,
            self.gateway.local_addr().port()
        )
    }

    /// `docker run -d` one sandbox pod with the security settings of
    /// container/k8s/sandboxtemplate.yaml: read-only root, all capabilities dropped
    /// but the six the supervisor needs, no_new_privs, a named volume at /sandbox, the
    /// projected token, podinfo and CA read-only.
    pub fn start_pod(&self, short: &str) -> Result<Pod, String> {
        self.start_pod_with(short, Dial::Ip)
    }

    pub fn start_pod_with(&self, short: &str, dial: Dial) -> Result<Pod, String> {
        let spec = PodSpec::new(&format!("{}-{short}", self.scope.id));
        let dir = self.dir.0.join(short);
        for d in ["token", "podinfo"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
        }
        let rotation = self
            .issuer
            .spawn_rotation(
                dir.join("token"),
                spec.clone(),
                AUDIENCE.into(),
                Duration::from_secs(3600),
                Duration::from_secs(1800),
            )
            .map_err(|e| e.to_string())?;
        let volume = self.scope.volume(short)?;
        let container = self.scope.container(short);
        let mount = |src: &Path, dst: &str| format!("{}:{dst}:ro", src.display());
        let env = [
            format!("SANDBOX_SUPERVISOR_POD_NAME={}", spec.pod_name),
            format!("SANDBOX_SUPERVISOR_POD_NAMESPACE={}", spec.namespace),
            format!("SANDBOX_SUPERVISOR_POD_UID={}", spec.pod_uid),
            "SANDBOX_SUPERVISOR_GATEWAY_CA=/etc/sandbox-gateway-ca/ca.crt".into(),
            "SANDBOX_SUPERVISOR_TOKEN_PATH=/var/run/secrets/sandbox-gateway/token".into(),
            "SANDBOX_SUPERVISOR_ANNOTATIONS_PATH=/etc/podinfo/labels".into(),
            format!("SANDBOX_SUPERVISOR_RELEASE_GRACE={RELEASE_GRACE_S}s"),
            "SANDBOX_SUPERVISOR_LOG_FORMAT=json".into(),
        ];
        let port = self.gateway.local_addr().port();
        let mut env = env.to_vec();
        let mut host = vec![];
        match dial {
            Dial::Ip => {
                env.push(format!("SANDBOX_SUPERVISOR_GATEWAY={}", self.gateway_url()));
                env.push(format!(
                    "SANDBOX_SUPERVISOR_GATEWAY_SERVER_NAME={GATEWAY_NAME}"
                ));
            }
            Dial::Name => {
                env.push(format!(
                    "SANDBOX_SUPERVISOR_GATEWAY=https://{GATEWAY_NAME}:{port}"
                ));
                host = vec![
                    "--add-host".to_string(),
                    format!("{GATEWAY_NAME}:{}", self.gateway_ip),
                ];
            }
        }
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            container.clone(),
            "--label".into(),
            self.scope.label(),
            "--network".into(),
            self.network.clone(),
            "--read-only".into(),
            "--tmpfs".into(),
            "/tmp:rw,nosuid,nodev,mode=1777".into(),
            "--security-opt".into(),
            "no-new-privileges".into(),
            "--cap-drop".into(),
            "ALL".into(),
        ];
        args.extend(host);
        for cap in [
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "KILL",
            "SETUID",
            "SETGID",
        ] {
            args.extend(["--cap-add".into(), cap.into()]);
        }
        args.extend([
            "-v".into(),
            format!("{volume}:/sandbox"),
            "-v".into(),
            mount(&dir.join("token"), "/var/run/secrets/sandbox-gateway"),
            "-v".into(),
            mount(&dir.join("podinfo"), "/etc/podinfo"),
            "-v".into(),
            mount(&self.ca, "/etc/sandbox-gateway-ca/ca.crt"),
        ]);
        for e in env {
            args.extend(["-e".into(), e]);
        }
        args.push(self.image.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)?;
        Ok(Pod {
            container,
            spec,
            volume,
            dir,
            rotation,
        })
    }

    /// Waits until the pod parks (seeded, registered, warm).
    pub async fn parked(&self, pod: &Pod) -> Result<(), String> {
        self.gateway
            .wait_parked(&pod.spec.pod_name, Duration::from_secs(60))
            .await
            .map(drop)
            .map_err(|e| format!("{} not parked: {e:#}\n{}", pod.container, pod.logs()))
    }

    /// Claims a parked pod and waits for its relay.
    pub async fn claim(&self, pod: &Pod) -> Result<Sandbox, String> {
        let sandbox = self
            .gateway
            .claim(&pod.spec.pod_name, ClaimOptions::default())
            .await
            .map_err(|e| format!("claiming {}: {e:#}", pod.container))?;
        self.gateway
            .wait_connected(sandbox.id(), Duration::from_secs(60))
            .await
            .map_err(|e| format!("{} not connected: {e:#}\n{}", pod.container, pod.logs()))
    }

    /// start_pod + parked + claim.
    pub async fn bound(&self, short: &str) -> Result<(Pod, Sandbox), String> {
        let pod = self.start_pod(short)?;
        self.parked(&pod).await?;
        let sandbox = self.claim(&pod).await?;
        Ok((pod, sandbox))
    }
}

impl Pod {
    /// Everything the container wrote to stdout and stderr, across restarts.
    pub fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.container])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs {}: {e})", self.container),
        }
    }

    /// The supervisor's JSON log lines.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Log lines with `event == name`.
    pub fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// Waits for `count` log lines with `event == name`: `docker logs` trails a running
    /// container by a moment.
    pub async fn wait_events(
        &self,
        name: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.events_named(name);
            if found.len() >= count {
                return Ok(found);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} of {count} {name} lines from {} within {timeout:?}\n{}",
                    found.len(),
                    self.container,
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn state(&self) -> Result<ContainerState, String> {
        let s = docker(&[
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.ExitCode}}",
            &self.container,
        ])?;
        let mut f = s.split_whitespace();
        Ok(ContainerState {
            running: f.next() == Some("true"),
            exit_code: f.next().and_then(|c| c.parse().ok()).unwrap_or(-1),
        })
    }

    /// Waits for the container to stop; its exit code.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.state()?;
            if !st.running {
                return Ok(st.exit_code);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} still running after {timeout:?}\n{}",
                    self.container,
                    self.logs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The container's address on `network`.
    pub fn ip(&self, network: &str) -> Result<IpAddr, String> {
        let s = docker(&[
            "inspect",
            "--format",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            &self.container,
        ])?;
        s.parse()
            .map_err(|e| format!("{} address {s:?}: {e}", self.container))
    }
}

/// A plain HTTP/1.1 GET from the host, as the kubelet's httpGet probe does:
/// (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("GET {path}: no status line in {text:?}"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| format!("GET http://{addr}{path}: no answer within 5s"))?
}
