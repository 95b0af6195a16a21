"""The core scenarios of docs/PROTOCOL.md, driven by a gateway written in Python with
grpcio (lazy response headers) against the real supervisor binary as PID 1."""

import os
import signal
import time

import pytest

from stubs import pb


def bound(pod_factory, gateway_factory, tag, push=True, **gw_kw):
    pod = pod_factory(tag)
    gw = gateway_factory(pod, **gw_kw)
    sup = pod.start(gw)
    gw.wait_parked(pod.name)
    sb = gw.claim(pod.name, push=push)
    if not push:
        pod.write_hint(sb.claim_uid)
    try:
        gw.wait_connected(sb)
    except TimeoutError:
        raise AssertionError(sup.logs())
    return pod, gw, sup, sb


def test_park_push_and_exec_with_stdout_stderr_and_exit(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "push")
    reg = gw.pods[pod.name].registers[0]
    assert reg.pod.uid == pod.uid and reg.instance_id and reg.seed.digest.startswith("sha256:")
    assert {"exec", "pty", "replay"} <= set(reg.capabilities)
    hello = sb.hellos[0]
    assert (hello.sandbox_id, hello.claim_uid, list(hello.sessions)) == (sb.id, sb.claim_uid, [])

    s = gw.open(sb, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert s.failed is None and s.pid > 0
    exit_ = gw.wait_exit(s)
    assert (bytes(s.stdout), bytes(s.stderr)) == (b"out\n", b"err\n")
    assert exit_.WhichOneof("how") == "exit_code" and exit_.exit_code == 3 and exit_.status == 3
    attach = s.attaches[0]
    assert (attach.stdout_offset, attach.stderr_offset, attach.generation > 0) == (0, 0, True)
    # The exit also comes on the control stream.
    gw.wait("the exit on the control stream", lambda: s.control_exit)
    assert s.control_exit.status == 3

    # A refused request is answered on the control stream, never with a stream.
    bad = gw.open(sb, ["/no/such/program"])
    assert bad.failed.code == pb.ERROR_CODE_NOT_FOUND, bad.failed
    dup = gw.open(sb, ["true"])
    gw.wait_exit(dup)


def test_pull_path_binds_on_the_claim_hint(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "pull", push=False)
    issued = gw.pods[pod.name].issues
    assert issued and issued[-1].claim_hint == sb.claim_uid
    s = gw.open(sb, ["echo", "pulled"])
    gw.wait_exit(s)
    assert bytes(s.stdout) == b"pulled\n"


def test_stdin_with_eof(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "stdin")
    s = gw.open(sb, ["cat"], stdin=True)
    gw.write_stdin(s, b"hello ")
    gw.write_stdin(s, b"world\n")
    gw.wait_output(s, b"hello world\n")
    gw.close_stdin(s)
    exit_ = gw.wait_exit(s)
    assert exit_.status == 0 and bytes(s.stdout) == b"hello world\n"
    gw.wait("StdinAck{eof}", lambda: s.stdin_closed)
    assert s.stdin_acked == 12
    assert s.errors == []


def test_pty_resize(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "pty")
    s = gw.open(sb, ["/bin/sh"], tty=(80, 24), stdin=True)
    gw.write_stdin(s, b"stty size; echo A-$((1+1))\n")
    gw.wait_output(s, b"A-2")
    assert b"24 80" in bytes(s.stdout)
    gw.down(s, resize=pb.Resize(cols=100, rows=30))
    gw.write_stdin(s, b"stty size; echo B-$((1+1))\n")
    gw.wait_output(s, b"B-2")
    assert b"30 100" in bytes(s.stdout)
    gw.write_stdin(s, b"exit 7\n")
    assert gw.wait_exit(s).status == 7


def test_signal_reaches_the_session(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "signal")
    s = gw.open(sb, ["sleep", "30"])
    gw.wait("the session's stream", lambda: s.down is not None)
    gw.down(s, signal=pb.Signal(signal=signal.SIGTERM))
    exit_ = gw.wait_exit(s)
    assert exit_.WhichOneof("how") == "signal" and exit_.signal == signal.SIGTERM
    assert exit_.status == 128 + signal.SIGTERM
    # A bad signal number is refused on the stream; the session goes on.
    t = gw.open(sb, ["sleep", "30"])
    gw.down(t, signal=pb.Signal(signal=99))
    gw.wait("the refusal", lambda: t.errors)
    assert t.errors[0].code == pb.ERROR_CODE_INVALID_ARGUMENT
    gw.forget(sb, t)


def test_dropped_streams_replay_from_the_offsets_held(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "drop")
    n = 200_000
    want = b"".join(b"%d\n" % i for i in range(1, n + 1))
    # Waits for a line of stdin first, so the drop comes mid-output, not after it.
    s = gw.open(sb, ["sh", "-c", f"read x; seq 1 {n}; echo done >&2"], stdin=True)
    gw.wait("the first stream", lambda: s.down is not None)
    s.drop_after = 64 * 1024
    gw.write_stdin(s, b"go\n")
    gw.wait("the drop", lambda: s.drop_after is None and s.down is None)
    assert not s.exit
    # A Session stream alone dropped: the gateway asks for it again itself.
    gw.send_control(sb, attach_session=pb.AttachSession(
        session_id=s.id, stdout_offset=len(s.stdout), stderr_offset=len(s.stderr)))
    # And the control stream too: the supervisor reconnects and lists the session.
    gw.drop_control(sb)
    gw.wait_connected(sb, connects=2)
    exit_ = gw.wait_exit(s, timeout=30)
    assert exit_.status == 0
    assert bytes(s.stdout) == want, (len(s.stdout), len(want))
    assert bytes(s.stderr) == b"done\n"
    listed = [st.session_id for st in sb.hellos[1].sessions]
    assert s.id in listed
    later = s.attaches[1:]
    assert later and all(a.stdout_offset > 0 for a in later), later
    gens = [a.generation for a in s.attaches]
    assert gens == sorted(gens) and len(set(gens)) == len(gens), gens
    assert s.stdin_acked == 3


def test_attach_below_what_was_acknowledged(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "below")
    gw.auto_forget = False
    s = gw.open(sb, ["echo", "twelve bytes"])
    gw.wait_exit(s)
    gw.wait("the final ack to land", lambda: s.down is not None)
    time.sleep(0.2)
    gw.send_control(sb, attach_session=pb.AttachSession(session_id=s.id))
    gw.wait("the re-attach", lambda: len(s.attaches) >= 2)
    a = s.attaches[1]
    assert (a.stdout_offset, a.stderr_offset) == (0, 0)
    gw.wait("the notice", lambda: s.errors)
    assert s.errors[0].code == pb.ERROR_CODE_FAILED_PRECONDITION, s.errors
    assert bytes(s.stdout) == b"twelve bytes\n"  # nothing was delivered twice
    gw.forget(sb, s)


def test_refresh_keeps_the_sandbox_token_fresh(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "refresh", token_ttl=2.0)
    gw.wait("two refreshes", lambda: sb.refreshes >= 2, timeout=10)
    # New streams use the refreshed token.
    s = gw.open(sb, ["echo", "fresh"])
    gw.wait_exit(s)
    assert bytes(s.stdout) == b"fresh\n"
    assert sup.running()


def test_release_reports_and_a_restart_refuses(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "release")
    s = gw.open(sb, ["sh", "-c", "echo data > tenant.txt; sleep 30"])
    gw.wait("the tenant's file", lambda: (pod.volume / "workspace/tenant.txt").exists())
    report = gw.release(sb, grace_ms=500)
    assert report.error == "" and report.files_removed >= 3 and report.processes_killed >= 1
    assert sup.wait(30) == 0, sup.logs()
    assert list((pod.volume / "workspace").iterdir()) == []
    # Released pods are never reused: a restart on the volume refuses.
    again = pod.start(gw)
    assert again.wait(30) == 65, again.logs()
    refused = again.events("reuse.refused")
    assert refused and refused[0]["reason"] == "tombstone", again.logs()


def test_refresh_denied_releases_with_the_report_on_a_new_connect(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "denied", token_ttl=2.0)
    gw.revoke(sb)
    assert sup.wait(30) == 0, sup.logs()
    assert sb.report is not None and sb.report.error == ""
    assert sb.connects >= 2  # the report came on a Connect of its own


def test_a_restart_whose_claim_is_gone_wipes_and_refuses(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "resume")
    s = gw.open(sb, ["sh", "-c", "echo secret > tenant.txt"])
    gw.wait_exit(s)
    sup.kill()  # a crash while bound
    gw.revoke(sb)
    again = pod.start(gw)
    assert again.wait(30) == 65, again.logs()
    resumed = [r for r in gw.pods[pod.name].registers if r.HasField("resume")]
    assert resumed and resumed[0].resume.claim_uid == sb.claim_uid
    assert resumed[0].resume.sandbox_id == sb.id
    assert not (pod.volume / "workspace/tenant.txt").exists()
    assert os.path.exists(pod.volume / ".supervisor/tombstone.json")
    refused = again.events("reuse.refused")
    assert refused and refused[0]["reason"] == "gateway_refused", again.logs()
