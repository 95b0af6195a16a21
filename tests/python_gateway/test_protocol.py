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


def test_the_session_error_table(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "errors")
    (pod.volume / "workspace/plain.txt").write_text("no shebang\n")
    os.chmod(pod.volume / "workspace/plain.txt", 0o755)
    refused = {
        "missing program": (["no-such-program"], {}, pb.ERROR_CODE_NOT_FOUND),
        "not executable": (["/etc/passwd"], {}, pb.ERROR_CODE_PERMISSION_DENIED),
        "no #!": (["./plain.txt"], {}, pb.ERROR_CODE_FAILED_PRECONDITION),
        "bad cwd": (["true"], {"cwd": "no/such/dir"}, pb.ERROR_CODE_INVALID_ARGUMENT),
        "unknown user": (["true"], {"user": "no-such-user"}, pb.ERROR_CODE_NOT_FOUND),
        "root refused": (["true"], {"user": "root"}, pb.ERROR_CODE_PERMISSION_DENIED),
        "empty argv": ([], {}, pb.ERROR_CODE_INVALID_ARGUMENT),
        "bad tty": (["true"], {"tty": (0, 24)}, pb.ERROR_CODE_INVALID_ARGUMENT),
        "bad id": (["true"], {"sid": "bad id!"}, pb.ERROR_CODE_INVALID_ARGUMENT),
    }
    for what, (argv, kw, code) in refused.items():
        s = gw.open(sb, argv, **kw)
        assert s.failed is not None and s.failed.code == code, (what, s.failed)
        assert s.failed.message, what

    running = gw.open(sb, ["sleep", "30"], stdin=False)
    dup = gw.open(sb, ["true"], sid=running.id)
    assert dup.failed.code == pb.ERROR_CODE_ALREADY_EXISTS, dup.failed

    # Refused frames: the stream and the session go on.
    gw.write_stdin(running, b"x")  # stdin=false: closed from the start
    gw.down(running, resize=pb.Resize(cols=80, rows=24))  # no terminal
    gw.wait("two refusals", lambda: len(running.errors) >= 2)
    assert [e.code for e in running.errors] == [pb.ERROR_CODE_FAILED_PRECONDITION] * 2
    assert running.stdin_closed  # the first StdinAck already said eof
    gw.forget(sb, running)
    # Forgetting a running session kills it: no Exited on its stream, the exit comes
    # on the control stream.
    gw.wait("the killed session's exit", lambda: running.control_exit)
    assert running.control_exit.signal == signal.SIGKILL and running.exit is None

    # An unknown session cannot be attached.
    gw.send_control(sb, attach_session=pb.AttachSession(session_id="never-opened"))
    ev = gw.wait("the refusal", lambda: next(
        (m.session_event.failed for m in sb.events if m.WhichOneof("msg") == "session_event"
         and m.session_event.session_id == "never-opened"), None))
    assert ev.code == pb.ERROR_CODE_NOT_FOUND


def test_too_many_sessions(pod_factory, gateway_factory):
    pod = pod_factory("limit")
    gw = gateway_factory(pod)
    sup = pod.start(gw, "--max-sessions", "2")
    gw.wait_parked(pod.name)
    sb = gw.claim(pod.name)
    gw.wait_connected(sb)
    gw.auto_forget = False
    done = gw.open(sb, ["true"])
    gw.wait_exit(done)
    gw.open(sb, ["sleep", "30"])
    # Exited but unforgotten sessions still count.
    third = gw.open(sb, ["true"])
    assert third.failed.code == pb.ERROR_CODE_RESOURCE_EXHAUSTED, third.failed
    gw.forget(sb, done)
    time.sleep(0.3)
    fourth = gw.open(sb, ["true"])
    assert fourth.failed is None


def test_stream_lifetime_after_exit_and_numeric_users(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "lifetime")
    gw.auto_forget = False
    s = gw.open(sb, ["sh", "-c", "id -u; echo $HOME"], user="12345", cwd="/")
    assert s.failed is None, s.failed
    gw.wait_exit(s)
    # A numeric uid without a passwd entry runs, with HOME=/.
    assert bytes(s.stdout) == b"12345\n/\n"
    time.sleep(1.0)
    assert s.down is not None, "the stream closed after Exited without being told"
    gw.forget(sb, s)
    gw.wait("the stream to end", lambda: s.down is None, timeout=5)
    # A forgotten session is gone.
    gw.send_control(sb, attach_session=pb.AttachSession(session_id=s.id))
    gw.wait("the refusal", lambda: any(
        m.WhichOneof("msg") == "session_event" and m.session_event.session_id == s.id
        and m.session_event.WhichOneof("event") == "failed" for m in sb.events))


def test_stdin_eof_on_a_pty_and_a_process_that_closes_its_stdin(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "eof")
    shell = gw.open(sb, ["/bin/sh"], tty=(80, 24), stdin=True)
    gw.write_stdin(shell, b"echo ready-$((1+1))\n")
    gw.wait_output(shell, b"ready-2")
    gw.close_stdin(shell)  # ^D at the prompt: the shell exits
    assert gw.wait_exit(shell).status == 0

    closer = gw.open(sb, ["sh", "-c", "exec 0<&-; echo closed; sleep 30"], stdin=True)
    gw.wait_output(closer, b"closed")
    gw.write_stdin(closer, b"first\n")  # accepted: handed to the writer
    gw.wait("the first ack", lambda: closer.stdin_acked == 6)
    time.sleep(0.3)
    gw.write_stdin(closer, b"second\n")  # the writer found the pipe closed
    gw.wait("StdinAck{eof}", lambda: closer.stdin_closed)
    gw.wait("the refusal", lambda: closer.errors)
    assert closer.errors[0].code == pb.ERROR_CODE_FAILED_PRECONDITION
    gw.forget(sb, closer)


def test_a_silent_gateway_loses_the_control_stream(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "silent", heartbeat_ms=300)
    gw.silent = True
    t0 = time.monotonic()
    gw.wait_connected(sb, connects=2, timeout=10)
    took = time.monotonic() - t0
    # More than three intervals of silence, noticed at an interval tick.
    print(f"silence noticed and reconnected after {took:.2f}s")
    assert 0.9 <= took <= 4.0, took
    gw.silent = False
    s = gw.open(sb, ["echo", "back"])
    gw.wait_exit(s)


def test_open_session_during_the_release_is_refused(pod_factory, gateway_factory):
    pod, gw, sup, sb = bound(pod_factory, gateway_factory, "relopen")
    stubborn = gw.open(sb, ["sh", "-c", "trap '' TERM; echo armed; sleep 30"])
    gw.wait_output(stubborn, b"armed")  # SIGTERM now leaves it, so the grace is waited
    gw.send_control(sb, release=pb.Release(reason="test", grace_ms=2000))
    time.sleep(0.3)
    late = gw.open(sb, ["true"])
    assert late.failed.code == pb.ERROR_CODE_UNAVAILABLE, late.failed
    assert "releasing" in late.failed.message
    gw.wait("the report", lambda: sb.report, timeout=20)
    assert sb.report.processes_killed >= 1
    assert sup.wait(20) == 0
    assert stubborn.control_exit is None or stubborn.control_exit.signal == signal.SIGKILL
