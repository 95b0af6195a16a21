"""Generates the Python stubs from proto/ once per test run, into a temporary directory
(nothing generated is committed), and exposes them as `pb` and `pb_grpc`."""

import atexit
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "sandbox/supervisor/v1/supervisor.proto"


def _generate() -> pathlib.Path:
    out = pathlib.Path(tempfile.mkdtemp(prefix="ssv-pystubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {PROTO}")
    return out


sys.path.insert(0, str(_generate()))

from sandbox.supervisor.v1 import supervisor_pb2 as pb  # noqa: E402
from sandbox.supervisor.v1 import supervisor_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
