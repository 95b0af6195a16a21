#!/usr/bin/env bash
# The project's test command (README, second command). Installs what the tests need on
# a fresh machine, then runs every check CI runs: format, lints, unit and integration
# tests (real binary as PID 1, real gRPC relay, reference gateway, the example image in
# the Docker engine), manifest validation.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v readelf >/dev/null || need_apt+=(binutils)
# tests/lifecycle.rs delays the real binary's fsyncs with strace's fault injection.
command -v strace >/dev/null || need_apt+=(strace)
# tests/gvisor.rs runs the real binary as PID 1 of a gVisor sandbox (Debian's runsc).
command -v runsc >/dev/null || need_apt+=(runsc)
# The static binary the container tests run links glibc statically (libc.a).
[ -e "$(gcc -print-file-name=libc.a 2>/dev/null)" ] || need_apt+=(libc6-dev)
if [ "${#need_apt[@]}" -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "test.sh: installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
if ! python3 -c 'import jsonschema, yaml, pytest' 2>/dev/null; then
  echo "test.sh: installing Python test dependencies"
  python3 -m pip install --quiet --disable-pip-version-check -r tests/manifests/requirements.txt
fi
# The Python (grpcio) gateway's scenarios: pinned grpcio, grpcio-tools (stubs are
# generated from proto/ at test time), protobuf.
if ! python3 -c 'import grpc, grpc_tools, google.protobuf, pytest' 2>/dev/null; then
  echo "test.sh: installing the Python gateway's dependencies"
  python3 -m pip install --quiet --disable-pip-version-check -r tests/python_gateway/requirements.txt
fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
# The production build (scripts/build-static.sh) leaves the reference gateway out.
cargo clippy --locked --no-default-features --bin sandbox-supervisor -- -D warnings
# The container tests (tests/docker.rs) run the static release binary in the example
# image. Build it here, once, so its time and size show as their own step; the tests
# take it from SSV_STATIC_BINARY. Without a usable Docker engine they skip themselves.
if [ "$(id -u)" = 0 ] && docker info >/dev/null 2>&1; then
  echo "== static binary (scripts/build-static.sh)"
  scripts/build-static.sh dist/sandbox-supervisor
  export SSV_STATIC_BINARY="$PWD/dist/sandbox-supervisor"
fi
echo "== cargo test"
cargo test --locked -- --test-threads="${TEST_THREADS:-2}"
# A second gateway, in Python with grpcio's defaults (lazy response headers), written
# from docs/PROTOCOL.md, drives the binary cargo test just built as PID 1.
echo "== python gateway"
SSV_BINARY="${SSV_BINARY:-$PWD/target/debug/sandbox-supervisor}" python3 -m pytest tests/python_gateway -q -rs
echo "== manifests"
python3 -m pytest tests/manifests -q
