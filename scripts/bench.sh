#!/usr/bin/env bash
# The benchmark command (BENCHMARKS.md): every DESIGN §8 figure beside a baseline measured
# in the same run. Installs tini (the idle-RSS baseline) when root and missing, builds the
# static production binary (its idle RSS and size are the figures that ship), then runs
# the supervisor bench and the workspace bench (seed vs cp -a, wipe vs rm -rf) in release.
#   scripts/bench.sh            # full run (a few minutes on 2 cores)
#   scripts/bench.sh --quick    # smaller sizes, for a smoke check
# The bench and the workspace bench build with the `profiling` profile (release code,
# thin LTO, symbols: a cold build in a fraction of fat LTO's time, and perf can read it);
# BENCH_PROFILE=bench (or release) measures the fat-LTO build instead. The idle row always
# runs the shipped static binary.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
if ! command -v tini >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tini
fi
mkdir -p bench-out
scripts/build-static.sh dist/sandbox-supervisor >bench-out/build-static.log 2>&1 || {
  echo "bench: the static build failed (see bench-out/build-static.log)" >&2; exit 1; }
export SSV_IDLE_BINARY="$PWD/dist/sandbox-supervisor"
{
  echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(date -u +%F)"
  cargo bench --locked --profile "${BENCH_PROFILE:-profiling}" --bench supervisor -- "${quick[@]}"
  scratch=$(mktemp -d /var/tmp/ssv-bench-XXXX)
  if [ "${#quick[@]}" -gt 0 ]; then ws=(--small --runs 2); else ws=(--runs 3); fi
  cargo run --locked --profile "${BENCH_PROFILE:-profiling}" --example workspace_bench -- "$scratch" "${ws[@]}"
  rm -rf "$scratch"
} 2>bench-out/bench.log | tee bench-out/results.md
echo "results: bench-out/results.md (logs: bench-out/bench.log)"
