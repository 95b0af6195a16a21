"""Validate container/k8s/ against the agent-sandbox CRD schemas, strictly and offline.

shared/ (with crds/) comes from SHARED_DIR or sits beside the repository
(<parent>/shared); the schema tests skip with the reason printed when it is absent.
Run: python3 -m pytest tests/manifests -q
"""

from __future__ import annotations

import copy

import pytest

import manifest_checks as mc

MANIFESTS = mc.load_manifests()
CORE_KINDS = {("v1", "ServiceAccount")}
REQUIRED_KINDS = {"ServiceAccount", "SandboxTemplate", "SandboxWarmPool", "SandboxClaim"}


def _by_kind(kind: str) -> dict:
    docs = [d for _, d in MANIFESTS if d.get("kind") == kind]
    assert len(docs) == 1, f"want exactly one {kind} manifest in {mc.MANIFEST_DIR}, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="session")
def crds() -> list[dict]:
    shared = mc.shared_dir()
    if shared is None:
        reason = (
            "shared/crds not found: set SHARED_DIR or place shared/ beside the repository "
            f"({mc.REPO_ROOT.parent / 'shared'}); CRD schema validation skipped"
        )
        pytest.skip(reason)  # conftest.py prints the reason in the summary, even with -q
    found = mc.load_crds(shared)
    assert found, f"no CustomResourceDefinition in {shared / 'crds'}"
    return found


def _validate(crds: list[dict], obj: dict) -> list[str]:
    return mc.schema_errors(mc.crd_validator(crds, obj["apiVersion"], obj["kind"]), obj)


def _template() -> dict:
    return copy.deepcopy(_by_kind("SandboxTemplate"))


def _pod(template: dict) -> dict:
    return template["spec"]["podTemplate"]["spec"]


def _token_source(template: dict) -> dict:
    for v in _pod(template)["volumes"]:
        for s in (v.get("projected") or {}).get("sources", []):
            if "serviceAccountToken" in s:
                return s["serviceAccountToken"]
    raise AssertionError("the template has no projected serviceAccountToken source")


# ----------------------------------------------------------------- the manifests


def test_every_required_kind_is_shipped():
    kinds = {d.get("kind") for _, d in MANIFESTS}
    assert REQUIRED_KINDS <= kinds, f"missing manifests for {sorted(REQUIRED_KINDS - kinds)}"


def test_every_manifest_kind_is_known(crds):
    for path, doc in MANIFESTS:
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in CORE_KINDS or mc.find_crd(crds, *key) is not None, f"{path.name}: no CRD serves {key}"


CRD_MANIFESTS = [(p, d) for p, d in MANIFESTS if (d.get("apiVersion"), d.get("kind")) not in CORE_KINDS]


@pytest.mark.parametrize(
    "path,doc", CRD_MANIFESTS, ids=[f"{p.name}:{d.get('kind')}" for p, d in CRD_MANIFESTS]
)
def test_manifest_is_valid(crds, path, doc):
    errors = _validate(crds, doc)
    assert errors == [], f"{path.name} fails its CRD schema:\n" + "\n".join(errors)


def test_agent_sandbox_kinds_use_v1beta1():
    for kind in REQUIRED_KINDS - {"ServiceAccount"}:
        assert _by_kind(kind)["apiVersion"] == "extensions.agents.x-k8s.io/v1beta1", kind


def test_service_account_structure():
    sa = _by_kind("ServiceAccount")
    assert sa["apiVersion"] == "v1"
    assert set(sa) <= {"apiVersion", "kind", "metadata", "automountServiceAccountToken",
                       "secrets", "imagePullSecrets"}, sorted(set(sa))
    assert set(sa["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert sa["metadata"]["name"] and sa["metadata"]["namespace"]
    assert sa["automountServiceAccountToken"] is False


def test_template_meets_supervisor_constraints():
    assert mc.template_errors(_template()) == []


def test_claim_expires():
    assert mc.claim_errors(_by_kind("SandboxClaim")) == []


def test_objects_reference_each_other():
    sa, tpl = _by_kind("ServiceAccount"), _by_kind("SandboxTemplate")
    pool, claim = _by_kind("SandboxWarmPool"), _by_kind("SandboxClaim")
    ns = {d["metadata"].get("namespace") for d in (sa, tpl, pool, claim)}
    assert len(ns) == 1 and None not in ns, f"all objects in one namespace, got {ns}"
    assert _pod(tpl)["serviceAccountName"] == sa["metadata"]["name"]
    assert pool["spec"]["sandboxTemplateRef"]["name"] == tpl["metadata"]["name"]
    assert claim["spec"]["warmPoolRef"]["name"] == pool["metadata"]["name"]


def test_template_egress_allows_only_gateway_and_dns():
    egress = _template()["spec"]["networkPolicy"]["egress"]
    ports = sorted((p.get("protocol", "TCP"), p["port"]) for rule in egress for p in rule["ports"])
    assert ports == [("TCP", 53), ("TCP", 8443), ("UDP", 53)], ports
    # Every rule names its peers: a rule without `to` would allow any destination.
    assert all(rule.get("to") for rule in egress)


# ---------------------------------------------------- the converter and strictness


def test_strict_schema_injects_and_keeps_maps():
    schema = mc.strict_schema({
        "type": "object",
        "properties": {
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "free": {"type": "object", "properties": {"a": {"type": "string"}},
                     "x-kubernetes-preserve-unknown-fields": True},
        },
    })
    assert schema["additionalProperties"] is False
    assert schema["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    assert "x-kubernetes-int-or-string" not in schema["properties"]["port"]
    assert "additionalProperties" not in schema["properties"]["free"]


def test_unknown_field_in_template_spec_fails(crds):
    t = _template()
    t["spec"]["networkPolicyy"] = {}
    errors = _validate(crds, t)
    assert any("networkPolicyy" in e for e in errors), errors


def test_unknown_field_deep_in_pod_spec_fails(crds):
    t = _template()
    _token_source(t)["audiences"] = ["sandbox-gateway"]  # typo of `audience`
    errors = _validate(crds, t)
    assert any("audiences" in e and "volumes" in e for e in errors), errors


def test_unknown_field_in_probe_fails(crds):
    t = _template()
    _pod(t)["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    assert any("paht" in e for e in _validate(crds, t))


def test_unknown_metadata_field_fails(crds):
    t = _template()
    t["metadata"]["labelz"] = {"a": "b"}
    assert any("labelz" in e for e in _validate(crds, t))


def test_wrong_types_fail(crds):
    t = _template()
    _token_source(t)["expirationSeconds"] = "3600"
    assert any("expirationSeconds" in e for e in _validate(crds, t))
    t = _template()
    _pod(t)["volumes"][0]["emptyDir"]["sizeLimit"] = "lots"
    assert any("sizeLimit" in e for e in _validate(crds, t))


def test_int_or_string_accepts_both(crds):
    t = _template()
    _pod(t)["containers"][0]["readinessProbe"]["httpGet"]["port"] = 9090
    assert _validate(crds, t) == []


def test_unknown_field_in_claim_and_pool_fails(crds):
    claim = copy.deepcopy(_by_kind("SandboxClaim"))
    claim["spec"]["lifecycle"]["shutdownAfter"] = "1h"
    assert any("shutdownAfter" in e for e in _validate(crds, claim))
    pool = copy.deepcopy(_by_kind("SandboxWarmPool"))
    pool["spec"]["replicas"] = -1
    assert any("replicas" in e for e in _validate(crds, pool))


def test_claim_shutdown_time_must_be_a_date_time(crds):
    claim = copy.deepcopy(_by_kind("SandboxClaim"))
    claim["spec"]["lifecycle"]["shutdownTime"] = "in an hour"
    assert any("shutdownTime" in e for e in _validate(crds, claim))


def test_wrong_api_version_is_not_served(crds):
    assert mc.find_crd(crds, "extensions.agents.x-k8s.io/v1", "SandboxTemplate") is None
    assert mc.find_crd(crds, "agents.x-k8s.io/v1beta1", "SandboxTemplate") is None


# ------------------------------------------- the constraints beyond the schema


@pytest.mark.parametrize("seconds", [300, 599, 3601, 7200])
def test_token_lifetime_outside_gateway_range_fails(seconds):
    t = _template()
    _token_source(t)["expirationSeconds"] = seconds
    assert any("expirationSeconds" in e for e in mc.template_errors(t))


@pytest.mark.parametrize("seconds", [600, 3600])
def test_token_lifetime_bounds_pass(seconds):
    t = _template()
    _token_source(t)["expirationSeconds"] = seconds
    assert mc.template_errors(t) == []


def test_missing_audience_fails(crds):
    t = _template()
    del _token_source(t)["audience"]
    assert _validate(crds, t) == []  # the schema cannot tell ...
    assert any("audience" in e for e in mc.template_errors(t))  # ... the extra check does


def test_token_mode_must_be_0400():
    t = _template()
    for v in _pod(t)["volumes"]:
        if "projected" in v:
            v["projected"]["defaultMode"] = 0o644
    assert any("0400" in e for e in mc.template_errors(t))


def test_supervisor_must_be_the_entrypoint():
    t = _template()
    _pod(t)["containers"][0]["command"] = ["/bin/sh", "-c", "exec /sandbox-supervisor run"]
    assert any("exactly one container" in e for e in mc.template_errors(t))
    t = _template()
    del _pod(t)["containers"][0]["command"]
    assert any("exactly one container" in e for e in mc.template_errors(t))
    t = _template()
    _pod(t)["containers"][0]["command"] = ["/sandbox-supervisor", "local"]
    assert any("`run`" in e for e in mc.template_errors(t))


def test_probes_must_hit_the_probe_port():
    t = _template()
    _pod(t)["containers"][0]["livenessProbe"]["httpGet"]["port"] = 8080
    assert any("livenessProbe" in e for e in mc.template_errors(t))
    t = _template()
    _pod(t)["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/livez"
    assert any("readinessProbe" in e for e in mc.template_errors(t))


def test_exec_probe_is_accepted():
    t = _template()
    c = _pod(t)["containers"][0]
    c["readinessProbe"] = {"exec": {"command": ["/sandbox-supervisor", "probe", "ready",
                                                "--addr", "127.0.0.1:9090"]}}
    c["livenessProbe"] = {"exec": {"command": ["/sandbox-supervisor", "probe", "live"]}}
    assert mc.template_errors(t) == []
    c["livenessProbe"] = {"exec": {"command": ["/sandbox-supervisor", "probe", "ready"]}}
    assert any("livenessProbe" in e for e in mc.template_errors(t))


def test_grace_period_must_exceed_release_grace():
    t = _template()
    _pod(t)["terminationGracePeriodSeconds"] = 10
    assert any("terminationGracePeriodSeconds" in e for e in mc.template_errors(t))
    for env in _pod(t)["containers"][0]["env"]:
        if env["name"] == "SANDBOX_SUPERVISOR_RELEASE_GRACE":
            env["value"] = "5s"
    assert mc.template_errors(t) == []


def test_misspelt_supervisor_env_fails():
    t = _template()
    _pod(t)["containers"][0]["env"].append({"name": "SANDBOX_SUPERVISOR_GATEWAY_CERT", "value": "/x"})
    assert any("GATEWAY_CERT" in e for e in mc.template_errors(t))


def test_privilege_settings_are_checked():
    t = _template()
    c = _pod(t)["containers"][0]
    c["securityContext"]["allowPrivilegeEscalation"] = True
    c["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    errors = mc.template_errors(t)
    assert any("allowPrivilegeEscalation" in e for e in errors)
    assert any("SYS_ADMIN" in e for e in errors)
    t = _template()
    _pod(t)["shareProcessNamespace"] = True
    assert any("shareProcessNamespace" in e for e in mc.template_errors(t))


def test_claim_hint_must_be_projected():
    t = _template()
    for v in _pod(t)["volumes"]:
        if "downwardAPI" in v:
            v["downwardAPI"]["items"] = [i for i in v["downwardAPI"]["items"] if i["path"] != "labels"]
    assert any("claim hint" in e for e in mc.template_errors(t))


def test_claim_without_lifecycle_fails():
    claim = copy.deepcopy(_by_kind("SandboxClaim"))
    del claim["spec"]["lifecycle"]
    assert mc.claim_errors(claim) != []


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("500ms", 0.5), ("1m30s", 90), ("2h", 7200), ("15", 15)])
def test_parse_duration(text, seconds):
    assert mc.parse_duration(text) == seconds


def test_parse_duration_rejects_garbage():
    with pytest.raises(ValueError):
        mc.parse_duration("10 parsecs")
