"""Fixtures: a Python gateway per test, pods whose processes and files are removed at the
end whatever happens. Skips (saying why) where the supervisor cannot run as PID 1."""

import pytest

import harness
from gateway import Gateway


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def pod_factory(request):
    why = harness.pid1_unavailable()
    if why:
        pytest.skip(f"skipped: python gateway scenarios: {why}")
    if harness.binary() is None:
        pytest.fail("no supervisor binary: run `cargo build --locked` or set SSV_BINARY")
    pods = []

    def make(tag):
        p = harness.Pod(tag)
        pods.append(p)
        return p

    yield make
    failed = getattr(request.node, "rep_call", None)
    for p in pods:
        if failed is not None and failed.failed:
            # The supervisor's side of a failure, shown with the test's output.
            for sup in p.supervisors:
                print(f"--- {sup.log.name} of pod {p.name}\n{sup.logs()}")
        p.cleanup()


@pytest.fixture
def gateway_factory():
    gateways = []

    def make(pod, **kw):
        gw = Gateway(pod.token, **kw)
        gateways.append(gw)
        return gw

    yield make
    for gw in gateways:
        gw.stop()
