#!/usr/bin/env bash
# The benchmark command (BENCHMARKS.md): every DESIGN §8 figure beside a baseline measured
# in the same run. Installs tini (the idle-RSS baseline) when root and missing, builds the
# static production binary (its idle RSS and size are the figures that ship), then runs
# the supervisor bench and the workspace bench (seed vs cp -a, wipe vs rm -rf) in release.
#   scripts/bench.sh            # full run (a few minutes on 2 cores)
#   scripts/bench.sh --quick    # smaller sizes, for a smoke check
#   scripts/bench.sh --pool     # only the pool bench (benches/pool.rs, ~4 min) and its plot
#   scripts/bench.sh --pool --pools 50,100,200,500 --rates 10,50,100,200   # bigger pools
# The pool bench writes bench-out/pool.json; scripts/pool_plot.py draws pool-latency.png
# from it (needs matplotlib: pip install matplotlib).
# The bench and the workspace bench build with the `profiling` profile (release code,
# thin LTO, symbols: a cold build in a fraction of fat LTO's time, and perf can read it);
# BENCH_PROFILE=bench (or release) measures the fat-LTO build instead. The idle row always
# runs the shipped static binary.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
pool_only=0
pool_args=()
for a in "$@"; do
  case "$a" in
    --quick) quick=(--quick) ;;
    --pool) pool_only=1 ;;
    *) pool_args+=("$a") ;;  # passed to the pool bench (--pools, --rates, --idle-secs, ...)
  esac
done
# tini is the idle baseline; a static busybox is the only file of the docker exec
# baseline's FROM-scratch image.
if [ "$(id -u)" = 0 ] && { ! command -v tini >/dev/null || [ ! -x /bin/busybox ]; }; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tini busybox-static
fi
mkdir -p bench-out
scripts/build-static.sh dist/sandbox-supervisor >bench-out/build-static.log 2>&1 || {
  echo "bench: the static build failed (see bench-out/build-static.log)" >&2; exit 1; }
export SSV_IDLE_BINARY="$PWD/dist/sandbox-supervisor"
pool() {
  cargo bench --locked --profile "${BENCH_PROFILE:-profiling}" --bench pool -- \
    "${quick[@]}" --out bench-out/pool.json "${pool_args[@]}"
  if python3 -c 'import matplotlib' 2>/dev/null; then
    python3 scripts/pool_plot.py bench-out/pool.json bench-out/pool-latency.png >&2
  else
    echo "bench: no matplotlib (pip install matplotlib); not plotting" >&2
  fi
}
{
  echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(date -u +%F)"
  echo "# cpu: $(lscpu | sed -n 's/^Model name: *//p')"
  if [ "$pool_only" = 1 ]; then
    pool
    exit 0
  fi
  cargo bench --locked --profile "${BENCH_PROFILE:-profiling}" --bench supervisor -- "${quick[@]}"
  pool
  scratch=$(mktemp -d /var/tmp/ssv-bench-XXXX)
  if [ "${#quick[@]}" -gt 0 ]; then ws=(--small --runs 2); else ws=(--runs 3); fi
  cargo run --locked --profile "${BENCH_PROFILE:-profiling}" --example workspace_bench -- "$scratch" "${ws[@]}"
  rm -rf "$scratch"
} 2>bench-out/bench.log | tee bench-out/results.md
echo "results: bench-out/results.md (logs: bench-out/bench.log)"
