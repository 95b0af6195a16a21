"""Runs the real supervisor binary as PID 1 of a new PID namespace, against the Python
gateway, with its volume, token and downward-API files in a temporary directory."""

import json
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[2]


def binary():
    """The supervisor under test: $SSV_BINARY, else cargo's debug build."""
    path = os.environ.get("SSV_BINARY") or str(REPO / "target/debug/sandbox-supervisor")
    return path if os.access(path, os.X_OK) else None


def pid1_unavailable():
    """Why the supervisor cannot run as PID 1 here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid --fork --mount-proc, and a sandbox user to switch to)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                       capture_output=True)
    if r.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {r.stderr.decode().strip()}"
    return None


class Pod:
    """The files a pod would have: volume, seed, projected token, annotations."""

    def __init__(self, tag):
        self.root = pathlib.Path(tempfile.mkdtemp(prefix=f"ssv-py-{tag}-"))
        self.root.chmod(0o755)  # the sandbox user traverses it to the workspace
        self.name = f"{tag}-pod"
        self.namespace = "default"
        self.uid = str(uuid.uuid4())
        for d in ("volume", "seed/src", "token", "podinfo"):
            (self.root / d).mkdir(parents=True)
        (self.root / "seed/README.md").write_text("seeded\n")
        (self.root / "seed/src/main.txt").write_text("hello seed\n")
        # Any bearer token will do: the supervisor presents it, this gateway checks it
        # is the one it wrote (a real gateway would validate a ServiceAccount JWT).
        self.token = "projected-" + secrets.token_urlsafe(16)
        (self.root / "token/token").write_text(self.token)
        (self.root / "podinfo/annotations").write_text("")
        self.supervisors = []

    @property
    def volume(self):
        return self.root / "volume"

    def write_hint(self, claim_uid):
        (self.root / "podinfo/annotations").write_text(
            f'agents.x-k8s.io/claim-uid="{claim_uid}"\n'
        )

    def start(self, gateway, *extra):
        sup = Supervisor(self, gateway, list(extra))
        self.supervisors.append(sup)
        return sup

    def cleanup(self):
        for sup in self.supervisors:
            sup.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class Supervisor:
    def __init__(self, pod, gateway, extra):
        self.log = pod.root / f"supervisor-{len(pod.supervisors)}.log"
        args = [
            "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", binary(), "run",
            "--volume", str(pod.volume),
            "--seed-dir", str(pod.root / "seed"),
            "--gateway", gateway.endpoint,
            "--allow-plaintext",
            "--token-path", str(pod.root / "token/token"),
            "--pod-name", pod.name,
            "--pod-namespace", pod.namespace,
            "--pod-uid", pod.uid,
            "--annotations-path", str(pod.root / "podinfo/annotations"),
            "--sandbox-user", "nobody",
            "--listen-probes", "off",
            "--release-grace", "1s",
            "--log-format", "json",
            "--log-level", "debug",
        ] + extra
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"},
            )

    def wait(self, timeout=30.0):
        """The exit code, or None if still running after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def running(self):
        return self.proc.poll() is None

    def kill(self):
        """SIGKILL to unshare; --kill-child takes PID 1, and with it the namespace."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def logs(self):
        return self.log.read_text(errors="replace")

    def events(self, name=None):
        out = []
        for line in self.logs().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def wait_event(self, name, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"no {name} event within {timeout}s\n{self.logs()}")
