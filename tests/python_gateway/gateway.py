"""A second gateway, in Python with grpcio, written from docs/PROTOCOL.md (not from the
Rust reference gateway). It uses grpcio's defaults, so response headers go out lazily
with a stream's first message, as with most gRPC servers.

Deliberately simple: state lives in plain objects under one lock; every stream has an
outbound queue that a handler thread drains; a reader thread per stream applies what
the supervisor sends. Tests drive it through the `Gateway` methods at the bottom.
"""

import queue
import secrets
import threading
import time
from concurrent import futures

import grpc

from stubs import pb, pb_grpc

# A queued item that ends the stream with this status instead of a message.
class Abort:
    def __init__(self, code, details):
        self.code = code
        self.details = details


END = object()  # a queued item that ends the stream cleanly (status OK)


def now_ms():
    return int(time.time() * 1000)


def bearer(context):
    for key, value in context.invocation_metadata():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


class Session:
    """One exec session as this gateway tracks it, across its Session streams."""

    def __init__(self, sid, spec):
        self.id = sid
        self.spec = spec
        self.started = False
        self.pid = None
        self.failed = None  # pb.Error from SessionEvent.failed
        self.stdout = bytearray()  # everything below len() is held
        self.stderr = bytearray()
        self.exit = None  # ExitStatus, from the Session stream (after all output)
        self.control_exit = None  # ExitStatus, from SessionEvent.exited
        self.errors = []  # SessionUp.Error frames
        self.stdin = bytearray()  # every stdin byte written (offset = index)
        self.stdin_eof = False  # a StdinEof was asked for
        self.stdin_acked = 0
        self.stdin_closed = False  # StdinAck.eof seen
        self.down = None  # outbound queue of the current Session stream
        self.newest_generation = 0
        self.attaches = []  # every Attach taken, in order
        self.refused_attaches = []  # (Attach, why) refused as stale
        self.forgotten = False
        self.drop_after = None  # test hook: end the stream once this much stdout is held
        self.stream_open_after_exit = None  # set when Exited arrived; cleared when it ends


class Sandbox:
    def __init__(self, sid, claim_uid, pod):
        self.id = sid
        self.claim_uid = claim_uid
        self.pod = pod
        self.revoked = False
        self.release_requested = None  # pb.Release, resent after a reconnect
        self.report = None
        self.reports = []
        self.sessions = {}
        self.control = None  # outbound queue of the live control stream
        self.hellos = []
        self.connects = 0
        self.refreshes = 0
        self.events = []  # every SupervisorMessage after Hello, for tests


class Pod:
    def __init__(self, name):
        self.name = name
        self.uid = ""
        self.registers = []  # every RegisterRequest
        self.issues = []  # every IssueSandboxTokenRequest
        self.parked = None  # queue of the current parked Register stream
        self.sandbox = None
        self.push = True
        self.released = False


class Servicer(pb_grpc.GatewayServicer):
    def __init__(self, gw):
        self.gw = gw

    # -- identity -----------------------------------------------------------------

    def _projected(self, context):
        if bearer(context) != self.gw.projected_token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "projected token not accepted")

    def _activation(self, sb):
        token = secrets.token_urlsafe(24)
        with self.gw.lock:
            self.gw.tokens[token] = sb.id
        return pb.Activation(
            sandbox_id=sb.id,
            claim_uid=sb.claim_uid,
            pod_uid=sb.pod.uid,
            token=token,
            token_expires_at_ms=now_ms() + int(self.gw.token_ttl * 1000),
            labels={"team": "python"},
        )

    def _resume(self, resume):
        """The activation for a resumed binding, or None if its claim is gone."""
        with self.gw.lock:
            sb = self.gw.sandboxes.get(resume.sandbox_id)
            ok = (
                sb is not None
                and sb.claim_uid == resume.claim_uid
                and not sb.revoked
                and sb.release_requested is None
            )
        return self._activation(sb) if ok else None

    def Register(self, request, context):
        self._projected(context)
        gw = self.gw
        with gw.cond:
            pod = gw.pods.setdefault(request.pod.name, Pod(request.pod.name))
            pod.uid = request.pod.uid
            pod.registers.append(request)
            released = pod.released
            sb = pod.sandbox if pod.push else None
            q = queue.Queue()
            pod.parked = q
            gw.cond.notify_all()
        if released:
            yield pb.RegisterEvent(
                rejected=pb.Rejected(reason="this pod was released; never reused", retryable=False)
            )
            return
        if request.HasField("resume"):
            act = self._resume(request.resume)
            if act is None:
                yield pb.RegisterEvent(
                    rejected=pb.Rejected(
                        reason=f"claim {request.resume.claim_uid} is gone", retryable=False
                    )
                )
            else:
                yield pb.RegisterEvent(activation=act)
            return
        if sb is not None:
            yield pb.RegisterEvent(activation=self._activation(sb))
            return
        yield pb.RegisterEvent(parked=pb.Parked(heartbeat_interval_ms=gw.heartbeat_ms))
        while context.is_active():
            try:
                item = q.get(timeout=gw.heartbeat_ms / 1000)
            except queue.Empty:
                yield pb.RegisterEvent(heartbeat=pb.Heartbeat())
                continue
            if item is END:
                return
            yield pb.RegisterEvent(activation=self._activation(item))
            return

    def IssueSandboxToken(self, request, context):
        self._projected(context)
        gw = self.gw
        with gw.cond:
            pod = gw.pods.setdefault(request.pod.name, Pod(request.pod.name))
            pod.issues.append(request)
            sb = pod.sandbox
            gw.cond.notify_all()
        if request.HasField("resume"):
            act = self._resume(request.resume)
            if act is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "the claim is gone")
            return pb.IssueSandboxTokenResponse(activation=act)
        if sb is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the pod is not claimed yet")
        if request.claim_hint and request.claim_hint != sb.claim_uid:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the hint names another claim")
        return pb.IssueSandboxTokenResponse(activation=self._activation(sb))

    def _sandbox(self, context):
        with self.gw.lock:
            sid = self.gw.tokens.get(bearer(context) or "")
            sb = self.gw.sandboxes.get(sid) if sid else None
        if sb is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown sandbox token")
        return sb

    def RefreshSandboxToken(self, request, context):
        sb = self._sandbox(context)
        if sb.revoked:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the claim is gone")
        act = self._activation(sb)
        with self.gw.cond:
            sb.refreshes += 1
            self.gw.cond.notify_all()
        return pb.RefreshSandboxTokenResponse(
            token=act.token, token_expires_at_ms=act.token_expires_at_ms
        )

    # -- control stream -------------------------------------------------------------

    def Connect(self, request_iterator, context):
        gw = self.gw
        sb = self._sandbox(context)
        # A gone claim is not refused here: refusing would lose the release report,
        # which comes on a Connect of its own. It is accepted and told to release.
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Hello")
        hello = first.hello
        if hello.sandbox_id != sb.id or hello.claim_uid != sb.claim_uid:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Hello names another sandbox")
        out = queue.Queue()
        frames = [pb.GatewayMessage(accepted=pb.Accepted(heartbeat_interval_ms=gw.heartbeat_ms))]
        with gw.cond:
            old, sb.control = sb.control, out
            sb.hellos.append(hello)
            sb.connects += 1
            listed = {s.session_id: s for s in hello.sessions}
            for sid, s in sb.sessions.items():
                state = listed.get(sid)
                if state is not None:
                    if not s.started:  # the Started event may have died with a stream
                        s.started, s.pid = True, state.pid
                    frames.append(
                        pb.GatewayMessage(
                            attach_session=pb.AttachSession(
                                session_id=sid,
                                stdout_offset=len(s.stdout),
                                stderr_offset=len(s.stderr),
                            )
                        )
                    )
                elif s.failed is None and not s.forgotten and s.exit is None:
                    s.failed = pb.Error(code=pb.ERROR_CODE_UNAVAILABLE, message="lost")
            for sid in listed:
                if sid not in sb.sessions or sb.sessions[sid].forgotten:
                    frames.append(pb.GatewayMessage(forget_session=pb.ForgetSession(session_id=sid)))
            if sb.revoked and sb.release_requested is None:
                sb.release_requested = pb.Release(reason="the claim is gone")
            if sb.release_requested is not None:
                frames.append(pb.GatewayMessage(release=sb.release_requested))
            gw.cond.notify_all()
        if old is not None:
            old.put(Abort(grpc.StatusCode.ABORTED, "replaced by a newer Connect"))
        threading.Thread(
            target=self._read_control, args=(sb, request_iterator, out), daemon=True
        ).start()
        yield from frames
        yield from drain(out, context, gw.heartbeat_ms / 1000,
                         lambda: None if gw.silent else pb.GatewayMessage(heartbeat=pb.Heartbeat()))

    def _read_control(self, sb, request_iterator, out):
        gw = self.gw
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("msg")
                with gw.cond:
                    sb.events.append(msg)
                    if kind == "session_event":
                        ev = msg.session_event
                        s = sb.sessions.get(ev.session_id)
                        which = ev.WhichOneof("event")
                        if s is not None:
                            if which == "started":
                                s.started, s.pid = True, ev.started.pid
                            elif which == "failed" and not s.started:
                                s.failed = ev.failed
                            # (a failed for a started session refused a duplicate
                            # OpenSession or a re-attach: the session itself is fine)
                            elif which == "exited":
                                s.control_exit = ev.exited
                    elif kind == "release_report":
                        sb.report = msg.release_report
                        sb.reports.append(msg.release_report)
                    gw.cond.notify_all()
        except grpc.RpcError:
            pass
        finally:
            with gw.cond:
                if sb.control is out:
                    sb.control = None
                gw.cond.notify_all()
            out.put(END)

    # -- session streams --------------------------------------------------------------

    def Session(self, request_iterator, context):
        gw = self.gw
        sb = self._sandbox(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "attach":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Attach")
        a = first.attach
        with gw.cond:
            s = sb.sessions.get(a.session_id)
            stale = None
            if s is not None and a.generation and a.generation < s.newest_generation:
                # The supervisor numbered its streams: this one is older than one taken.
                stale = f"attach generation {a.generation} is older than {s.newest_generation}"
                s.refused_attaches.append((a, stale))
                gw.cond.notify_all()
        if s is None or s.forgotten:
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {a.session_id} is not known")
        if stale:
            context.abort(grpc.StatusCode.ABORTED, f"stale Session stream: {stale}")
        out = queue.Queue()
        resend = []
        with gw.cond:
            s.newest_generation = max(s.newest_generation, a.generation)
            old, s.down = s.down, out
            s.attaches.append(a)
            # Stdin the supervisor has not accepted goes again, before anything new.
            if a.HasField("stdin_offset"):
                off = a.stdin_offset
                if off < len(s.stdin):
                    resend.append(pb.SessionDown(stdin=pb.Stdin(data=bytes(s.stdin[off:]), offset=off)))
                if s.stdin_eof and not s.stdin_closed:
                    resend.append(pb.SessionDown(stdin_eof=pb.StdinEof(offset=len(s.stdin))))
            gw.cond.notify_all()
        if old is not None:
            old.put(Abort(grpc.StatusCode.ABORTED, "re-attached on a newer stream"))
        threading.Thread(
            target=self._read_session, args=(sb, s, request_iterator, out), daemon=True
        ).start()
        yield from resend
        yield from drain(out, context, 0.5, None)

    def _read_session(self, sb, s, request_iterator, out):
        gw = self.gw
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("msg")
                ack = None
                with gw.cond:
                    if s.down is not out:
                        continue  # a replaced stream: its frames are not ours to take
                    if kind == "output":
                        o = msg.output
                        buf = s.stdout if o.stream == pb.STREAM_KIND_STDOUT else s.stderr
                        end = o.offset + len(o.data)
                        if o.offset > len(buf):
                            s.errors.append(pb.Error(message=f"output gap at {o.offset}"))
                        elif end > len(buf):
                            buf.extend(o.data[len(buf) - o.offset:])  # dedupe by offset
                        ack = pb.SessionDown(
                            ack=pb.Ack(stdout_offset=len(s.stdout), stderr_offset=len(s.stderr))
                        )
                        if s.drop_after is not None and len(s.stdout) >= s.drop_after:
                            s.drop_after = None
                            out.put(Abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test"))
                    elif kind == "exited":
                        s.exit = msg.exited
                        s.stream_open_after_exit = time.monotonic()
                        ack = pb.SessionDown(
                            ack=pb.Ack(stdout_offset=len(s.stdout), stderr_offset=len(s.stderr))
                        )
                    elif kind == "stdin_ack":
                        s.stdin_acked = max(s.stdin_acked, msg.stdin_ack.offset)
                        s.stdin_closed = s.stdin_closed or msg.stdin_ack.eof
                    elif kind == "error":
                        s.errors.append(msg.error)
                    gw.cond.notify_all()
                if ack is not None:
                    out.put(ack)
                if kind == "exited" and gw.auto_forget:
                    gw.forget(sb, s)
        except grpc.RpcError:
            pass
        finally:
            with gw.cond:
                if s.down is out:
                    s.down = None
                s.stream_open_after_exit = None
                gw.cond.notify_all()
            out.put(END)


def drain(out, context, every, idle):
    """Yields what is queued until END or an Abort; `idle()` is sent after `every`
    seconds without anything (heartbeats), if given."""
    while context.is_active():
        try:
            item = out.get(timeout=every)
        except queue.Empty:
            beat = idle() if idle is not None else None
            if beat is not None:
                yield beat
            continue
        if item is END:
            return
        if isinstance(item, Abort):
            context.abort(item.code, item.details)
        yield item


class Gateway:
    """The server plus what tests do with it."""

    def __init__(self, projected_token, heartbeat_ms=500, token_ttl=600.0):
        self.projected_token = projected_token
        self.heartbeat_ms = heartbeat_ms
        self.token_ttl = token_ttl
        self.auto_forget = True
        self.silent = False  # test hook: no heartbeats on control streams
        self.cond = threading.Condition()
        self.lock = self.cond
        self.pods = {}
        self.sandboxes = {}
        self.tokens = {}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        pb_grpc.add_GatewayServicer_to_server(Servicer(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(grace=0).wait(5)

    def wait(self, what, predicate, timeout=15.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.2))

    # -- pods and claims ----------------------------------------------------------

    def wait_parked(self, pod_name, timeout=20.0):
        self.wait(f"pod {pod_name} to park",
                  lambda: pod_name in self.pods and self.pods[pod_name].parked is not None,
                  timeout)
        return self.pods[pod_name]

    def claim(self, pod_name, push=True):
        """A claim adopts the pod: pushed on the parked stream, or (push=False) only
        answered on the pull path."""
        with self.cond:
            pod = self.pods.setdefault(pod_name, Pod(pod_name))
            sb = Sandbox(f"sbx-{secrets.token_hex(4)}", f"claim-{secrets.token_hex(8)}", pod)
            self.sandboxes[sb.id] = sb
            pod.sandbox, pod.push = sb, push
            parked = pod.parked
            self.cond.notify_all()
        if push and parked is not None:
            parked.put(sb)
        return sb

    def wait_connected(self, sb, connects=1, timeout=15.0):
        return self.wait(f"sandbox {sb.id} to connect",
                         lambda: sb.control is not None and sb.connects >= connects, timeout)

    def revoke(self, sb):
        with self.cond:
            sb.revoked = True
            self.cond.notify_all()

    def send_control(self, sb, **frame):
        self.wait_connected(sb)
        with self.cond:
            sb.control.put(pb.GatewayMessage(**frame))

    def drop_control(self, sb):
        with self.cond:
            if sb.control is not None:
                sb.control.put(Abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test"))

    def release(self, sb, grace_ms=1000, timeout=30.0):
        rel = pb.Release(reason="python gateway test", grace_ms=grace_ms)
        with self.cond:
            sb.release_requested = rel
            control = sb.control
        if control is not None:
            control.put(pb.GatewayMessage(release=rel))
        return self.wait("the release report", lambda: sb.report, timeout)

    # -- sessions -----------------------------------------------------------------

    def open(self, sb, argv, *, tty=None, stdin=False, env=None, cwd="", user="", timeout_ms=0,
             sid=None):
        """Sends OpenSession; returns the Session once Started or Failed arrived."""
        sid = sid or f"py-{secrets.token_hex(6)}"
        spec = pb.ExecSpec(argv=argv, env=env or {}, cwd=cwd, user=user, stdin=stdin,
                           timeout_ms=timeout_ms)
        if tty is not None:
            spec.tty.CopyFrom(pb.Tty(cols=tty[0], rows=tty[1]))
        s = Session(sid, spec)
        with self.cond:
            existing = sb.sessions.setdefault(sid, s)
            seen = len(sb.events)
        self.send_control(sb, open_session=pb.OpenSession(session_id=sid, spec=spec))
        if existing is not s:
            # A duplicate id: its answer is the first event for the id from now on.
            ev = self.wait(f"the answer to a second OpenSession {sid}", lambda: next(
                (m.session_event for m in sb.events[seen:]
                 if m.WhichOneof("msg") == "session_event"
                 and m.session_event.session_id == sid), None))
            s.failed = ev.failed if ev.WhichOneof("event") == "failed" else None
            s.started = ev.WhichOneof("event") == "started"
            return s
        self.wait(f"session {sid} to start", lambda: s.started or s.failed is not None)
        return s

    def down(self, s, **frame):
        """Sends a frame down the session's current stream (waiting for one)."""
        with self.cond:
            self.wait(f"a stream for session {s.id}", lambda: s.down is not None)
            s.down.put(pb.SessionDown(**frame))

    def write_stdin(self, s, data):
        with self.cond:
            off = len(s.stdin)
            s.stdin.extend(data)
            # Retained until acked; a stream that dies with it is resent on re-attach.
            if s.down is not None:
                s.down.put(pb.SessionDown(stdin=pb.Stdin(data=data, offset=off)))

    def close_stdin(self, s):
        with self.cond:
            s.stdin_eof = True
            if s.down is not None:
                s.down.put(pb.SessionDown(stdin_eof=pb.StdinEof(offset=len(s.stdin))))

    def drop_stream(self, s):
        with self.cond:
            if s.down is not None:
                s.down.put(Abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test"))

    def wait_exit(self, s, timeout=15.0):
        return self.wait(f"session {s.id} to exit", lambda: s.exit, timeout)

    def wait_output(self, s, needle, timeout=15.0):
        return self.wait(f"{needle!r} in the output of {s.id}",
                         lambda: needle in bytes(s.stdout), timeout)

    def forget(self, sb, s):
        with self.cond:
            s.forgotten = True
            control = sb.control
            down = s.down
        if control is not None:
            control.put(pb.GatewayMessage(forget_session=pb.ForgetSession(session_id=s.id)))
        if down is not None:
            down.put(END)
