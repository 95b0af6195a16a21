"""Offline validation of the Kubernetes manifests in container/k8s/.

Two layers:

* ``crd_validator``: the CRD's openAPIV3Schema turned into a strict JSON Schema
  (unknown fields fail, as they would with a server-side strict field validation),
  so a typo anywhere in a SandboxTemplate's pod spec is caught without a cluster.
* ``template_errors`` / ``claim_errors``: what a schema cannot express but the
  supervisor relies on (token audience and lifetime, the supervisor as entrypoint,
  probe port, grace period vs. release grace, ...).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = REPO_ROOT / "container" / "k8s"

SUPERVISOR_BIN = "/sandbox-supervisor"
ENV_PREFIX = "SANDBOX_SUPERVISOR_"
# The supervisor's options that have an environment variable (flag --x-y -> X_Y).
# A name outside this set in a manifest is a typo the supervisor would silently ignore.
KNOWN_ENV = {
    ENV_PREFIX + name
    for name in (
        "VOLUME", "SEED_DIR", "SEED_ARCHIVE", "SEED_URL", "SEED_SHA256",
        "GATEWAY", "GATEWAY_CA", "GATEWAY_SERVER_NAME", "ALLOW_PLAINTEXT",
        "TOKEN_PATH", "AUDIENCE", "POD_NAME", "POD_NAMESPACE", "POD_UID",
        "ANNOTATIONS_PATH", "CLAIM_ANNOTATION", "SANDBOX_USER",
        "LISTEN_PROBES", "RELEASE_GRACE",
    )
}
# The supervisor's defaults, used when a manifest does not set the variable.
DEFAULTS = {
    "VOLUME": "/sandbox",
    "TOKEN_PATH": "/var/run/secrets/sandbox-gateway/token",
    "ANNOTATIONS_PATH": "/etc/podinfo/annotations",
    "LISTEN_PROBES": "0.0.0.0:9090",
    "RELEASE_GRACE": "10s",
}
# What the gateway accepts for the projected token's lifetime (DESIGN §3).
TOKEN_MIN_SECONDS, TOKEN_MAX_SECONDS = 600, 3600
# Capabilities the supervisor may be given; see the comments in sandboxtemplate.yaml.
ALLOWED_CAPS = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETUID", "SETGID", "LINUX_IMMUTABLE"}
POD_ENV_FIELDS = {
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_UID": "metadata.uid",
}

# ---------------------------------------------------------------- locating shared/


def shared_dir() -> Path | None:
    """shared/ from SHARED_DIR, else beside the repository (<parent>/shared, as CI clones it)."""
    env = os.environ.get("SHARED_DIR")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared"]
    for c in candidates:
        if (c / "crds").is_dir():
            return c
    return None


def load_crds(shared: Path) -> list[dict]:
    crds = []
    for path in sorted((shared / "crds").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    return crds


def load_manifests(directory: Path = MANIFEST_DIR) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


# ------------------------------------------------------- CRD schema -> JSON Schema

# metadata is not described by CRD schemas (the API server validates ObjectMeta
# itself); the example manifests may use only these fields.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LOOSE_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string", "minLength": 1},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "required": ["name"],
    "additionalProperties": False,
}


def strict_schema(node: Any) -> Any:
    """Convert a Kubernetes structural schema to a strict JSON Schema.

    * ``x-kubernetes-*`` extensions are dropped; ``x-kubernetes-int-or-string`` becomes
      integer-or-string; ``x-kubernetes-preserve-unknown-fields`` keeps unknown fields.
    * ``nullable: true`` admits null.
    * ``additionalProperties: false`` is injected wherever ``properties`` is given and
      ``additionalProperties`` is not, so an unknown field fails (Kubernetes prunes or,
      with strict field validation, rejects it; a silent prune is a lost setting).
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-embedded-resource"
    )
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if isinstance(value, str):
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
            raise ValueError(f"not an RFC 3339 date-time: {value!r}")
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


def find_crd(crds: Iterable[dict], api_version: str, kind: str) -> tuple[dict, dict] | None:
    """The CRD and version entry serving ``kind`` at ``apiVersion`` (group/version)."""
    if "/" not in api_version:
        return None
    group, version = api_version.split("/", 1)
    for crd in crds:
        spec = crd["spec"]
        if spec["group"] != group or spec["names"]["kind"] != kind:
            continue
        for v in spec["versions"]:
            if v["name"] == version and v.get("served", False):
                return crd, v
    return None


_VALIDATORS: dict[tuple[int, str, str], jsonschema.Validator] = {}


def crd_validator(crds: list[dict], api_version: str, kind: str) -> jsonschema.Validator:
    """A strict validator for ``kind`` at ``apiVersion``, built once per CRD list."""
    key = (id(crds), api_version, kind)
    if key not in _VALIDATORS:
        _VALIDATORS[key] = _build_validator(crds, api_version, kind)
    return _VALIDATORS[key]


def _build_validator(crds: list[dict], api_version: str, kind: str) -> jsonschema.Validator:
    found = find_crd(crds, api_version, kind)
    if found is None:
        raise LookupError(f"no served CRD version for kind {kind!r} at apiVersion {api_version!r}")
    _, version = found
    schema = strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = LOOSE_METADATA
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=FORMATS)


def schema_errors(validator: jsonschema.Validator, obj: dict) -> list[str]:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ------------------------------------------------------------ semantic checks


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``10s``, ``500ms``, ``1m30s``, ``2h`` (bare number = s)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"cannot parse duration {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", []) or []}


def _env_value(container: dict, short: str) -> str:
    entry = _env(container).get(ENV_PREFIX + short)
    if entry is not None and "value" in entry:
        return str(entry["value"])
    return DEFAULTS[short]


def _mount_for(container: dict, path: str) -> dict | None:
    """The volumeMount whose mountPath contains ``path`` (deepest first)."""
    best = None
    for m in container.get("volumeMounts", []) or []:
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    return best


def supervisor_containers(pod_spec: dict) -> list[dict]:
    out = []
    for c in pod_spec.get("containers", []) or []:
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        if argv[:1] == [SUPERVISOR_BIN]:
            out.append(c)
    return out


def _probe_errors(name: str, probe: dict | None, path: str, container: dict, port: int) -> list[str]:
    if not probe:
        return [f"{name}: missing; the supervisor serves {path} on port {port}"]
    if "httpGet" in probe:
        http = probe["httpGet"]
        target = http.get("port")
        if isinstance(target, str):
            named = {p.get("name"): p.get("containerPort") for p in container.get("ports", []) or []}
            if target not in named:
                return [f"{name}: httpGet.port {target!r} names no port of the container"]
            target = named[target]
        errs = []
        if target != port:
            errs.append(f"{name}: httpGet port {target} is not the supervisor's probe port {port}")
        if http.get("path") != path:
            errs.append(f"{name}: httpGet path {http.get('path')!r}, want {path!r}")
        return errs
    if "exec" in probe:
        cmd = probe["exec"].get("command") or []
        want = ["probe", path.strip("/").removesuffix("z")]  # /readyz -> ready
        if cmd[:1] != [SUPERVISOR_BIN] or cmd[1:3] != want:
            return [f"{name}: exec {cmd!r} is not `{SUPERVISOR_BIN} {' '.join(want)}`"]
        if "--addr" in cmd:
            addr = cmd[cmd.index("--addr") + 1] if cmd.index("--addr") + 1 < len(cmd) else ""
            if not addr.endswith(f":{port}"):
                return [f"{name}: exec --addr {addr!r} is not the probe port {port}"]
        return []
    return [f"{name}: neither httpGet nor exec against the supervisor"]


def template_errors(template: dict) -> list[str]:
    """Constraints on a SandboxTemplate that its CRD schema cannot express."""
    errs: list[str] = []
    pod = template.get("spec", {}).get("podTemplate", {}).get("spec", {})
    volumes = {v["name"]: v for v in pod.get("volumes", []) or []}

    sups = supervisor_containers(pod)
    if len(sups) != 1:
        errs.append(
            f"want exactly one container whose command starts with {SUPERVISOR_BIN} (found {len(sups)});"
            " set command explicitly so the supervisor is PID 1 whatever the image's ENTRYPOINT"
        )
        return errs
    c = sups[0]
    argv = list(c.get("command") or []) + list(c.get("args") or [])
    if argv[1:2] != ["run"]:
        errs.append(f"supervisor argv {argv!r}: the entrypoint subcommand must be `run`")
    if pod.get("shareProcessNamespace"):
        errs.append("shareProcessNamespace: true makes the pause container PID 1, not the supervisor")
    if pod.get("automountServiceAccountToken") is not False:
        errs.append("pod automountServiceAccountToken must be false (no API token in a sandbox)")

    env = _env(c)
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in KNOWN_ENV:
            errs.append(f"env {name}: not an option of the supervisor (typo?)")
    for short, field in POD_ENV_FIELDS.items():
        ref = (env.get(ENV_PREFIX + short) or {}).get("valueFrom", {}).get("fieldRef", {})
        if ref.get("fieldPath") != field:
            errs.append(f"env {ENV_PREFIX}{short} must come from the downward API fieldRef {field}")
    if str((env.get(ENV_PREFIX + "ALLOW_PLAINTEXT") or {}).get("value", "")).lower() in ("true", "1", "yes"):
        errs.append("ALLOW_PLAINTEXT is for local tests only, never in a deployment manifest")

    # The projected token: audience, lifetime, mode, and where the supervisor reads it.
    token_path = _env_value(c, "TOKEN_PATH")
    token_sources = [
        (vname, v, s["serviceAccountToken"])
        for vname, v in volumes.items()
        for s in (v.get("projected") or {}).get("sources", []) or []
        if "serviceAccountToken" in s
    ]
    if len(token_sources) != 1:
        errs.append(f"want exactly one projected serviceAccountToken source, found {len(token_sources)}")
    else:
        vname, vol, sat = token_sources[0]
        audience = sat.get("audience")
        if not audience:
            errs.append("serviceAccountToken.audience must be set to the gateway's audience")
        exp = sat.get("expirationSeconds")
        if not isinstance(exp, int) or not TOKEN_MIN_SECONDS <= exp <= TOKEN_MAX_SECONDS:
            errs.append(
                f"serviceAccountToken.expirationSeconds={exp!r}: want {TOKEN_MIN_SECONDS}..{TOKEN_MAX_SECONDS}"
            )
        if vol["projected"].get("defaultMode") != 0o400:
            mode = vol["projected"].get("defaultMode")
            errs.append(f"token volume defaultMode={oct(mode) if isinstance(mode, int) else mode!r}: want 0400")
        mount = _mount_for(c, token_path)
        if mount is None or mount["name"] != vname:
            errs.append(f"token path {token_path} is not inside the mount of volume {vname!r}")
        elif posixpath.relpath(token_path, mount["mountPath"]) != sat.get("path"):
            errs.append(f"token path {token_path} does not match the source path {sat.get('path')!r}")
        declared = (env.get(ENV_PREFIX + "AUDIENCE") or {}).get("value")
        if declared is not None and declared != audience:
            errs.append(f"AUDIENCE={declared!r} differs from the projected token's audience {audience!r}")

    # The claim hint file must be a downward-API file of the pod's labels or annotations.
    hint = _env_value(c, "ANNOTATIONS_PATH")
    mount = _mount_for(c, hint)
    dapi = (volumes.get(mount["name"]) or {}).get("downwardAPI") if mount else None
    item_fields = {
        i.get("path"): (i.get("fieldRef") or {}).get("fieldPath") for i in (dapi or {}).get("items", []) or []
    }
    rel = posixpath.relpath(hint, mount["mountPath"]) if mount else None
    if item_fields.get(rel) not in ("metadata.annotations", "metadata.labels"):
        errs.append(f"claim hint {hint} is not a downwardAPI file of metadata.annotations or metadata.labels")

    # Paths the supervisor reads or writes must be on volumes; the root fs is read-only.
    workspace = _env_value(c, "VOLUME")
    wmount = _mount_for(c, workspace)
    if wmount is None or wmount["mountPath"].rstrip("/") != workspace.rstrip("/"):
        errs.append(f"the workspace volume root {workspace} must be a volume mount of its own")
    elif wmount.get("readOnly"):
        errs.append(f"the workspace volume at {workspace} must be writable")
    ca = (env.get(ENV_PREFIX + "GATEWAY_CA") or {}).get("value")
    if ca is not None and _mount_for(c, ca) is None:
        errs.append(f"GATEWAY_CA {ca} is not on any mounted volume")

    # Probes at the supervisor's probe port.
    port = int(_env_value(c, "LISTEN_PROBES").rsplit(":", 1)[1])
    errs += _probe_errors("readinessProbe", c.get("readinessProbe"), "/readyz", c, port)
    errs += _probe_errors("livenessProbe", c.get("livenessProbe"), "/livez", c, port)

    # The kubelet must wait longer than the supervisor's release grace.
    grace = parse_duration(_env_value(c, "RELEASE_GRACE"))
    tgps = pod.get("terminationGracePeriodSeconds")
    if not isinstance(tgps, int) or tgps <= grace:
        errs.append(f"terminationGracePeriodSeconds={tgps!r} must exceed the release grace ({grace:g}s)")

    # Security context: least privilege for a root supervisor.
    sc = c.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}
    if sc.get("allowPrivilegeEscalation") is not False:
        errs.append("securityContext.allowPrivilegeEscalation must be false")
    if sc.get("privileged"):
        errs.append("securityContext.privileged must not be set")
    if sc.get("readOnlyRootFilesystem") is not True:
        errs.append("securityContext.readOnlyRootFilesystem must be true")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        errs.append(f"seccompProfile type {seccomp!r}: want RuntimeDefault (or a Localhost profile)")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        errs.append("capabilities.drop must include ALL")
    extra = set(caps.get("add") or []) - ALLOWED_CAPS
    if extra:
        errs.append(f"capabilities.add has {sorted(extra)} beyond what the supervisor needs {sorted(ALLOWED_CAPS)}")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) not in (0, None):
        errs.append("the supervisor must run as root (runAsUser 0) to own its records and drop the workload")
    return errs


def claim_errors(claim: dict) -> list[str]:
    """A SandboxClaim must expire: lifecycle.shutdownTime set."""
    lifecycle = claim.get("spec", {}).get("lifecycle") or {}
    if not lifecycle.get("shutdownTime"):
        return ["spec.lifecycle.shutdownTime must be set so the claim expires"]
    return []
