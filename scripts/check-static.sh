#!/usr/bin/env bash
# Prove that a binary is fully static, so it runs in a `FROM scratch` image and in any
# sandbox image regardless of its libc: no PT_INTERP program header (nothing asks the
# kernel for a dynamic loader) and no DT_NEEDED entry (no shared library is loaded).
# Also reports the stripped size against the 8 MiB target.
#
# Usage: scripts/check-static.sh [--enforce-size] <binary>
#   --enforce-size   also fail when the stripped size exceeds the target
#   CHECK_STATIC_MAX_BYTES  the size target in bytes (default 8388608 = 8 MiB)
# Needs: readelf and strip (Debian: binutils).
# Exit: 0 static (and within the size target when enforced), 1 check failed, 2 usage.
set -euo pipefail

enforce_size=0
if [[ "${1:-}" == "--enforce-size" ]]; then
    enforce_size=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--enforce-size] <binary>" >&2
    exit 2
fi
bin=$1
max_bytes=${CHECK_STATIC_MAX_BYTES:-8388608}

for tool in readelf strip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "check-static: '$tool' not found; install binutils (apt-get install binutils)" >&2
        exit 2
    fi
done
if [[ ! -f "$bin" ]]; then
    echo "check-static: $bin: no such file; build it first (scripts/build-static.sh)" >&2
    exit 2
fi

# readelf -h fails on anything that is not ELF, so a script or a truncated file cannot
# pass as "static" just because it has no program headers.
if ! header=$(LC_ALL=C readelf -hW "$bin" 2>&1); then
    echo "FAIL $bin: not an ELF file: $header" >&2
    exit 1
fi
elf_type=$(awk -F: '/^ *Type:/ {gsub(/^ +/, "", $2); print $2; exit}' <<<"$header")

failed=0
# PT_INTERP shows up as an "INTERP" program header line.
if LC_ALL=C readelf -lW "$bin" 2>/dev/null | grep -qE '^[[:space:]]*INTERP[[:space:]]'; then
    interp=$(LC_ALL=C readelf -lW "$bin" | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]/\1/p')
    echo "FAIL $bin: has PT_INTERP (dynamic loader ${interp:-?}); build with -C target-feature=+crt-static" >&2
    failed=1
fi
# A static-pie binary (what crt-static produces on the gnu target) still has a dynamic
# section for its own relocations; only NEEDED entries mean shared libraries.
needed=$(LC_ALL=C readelf -dW "$bin" 2>/dev/null | grep -E '\(NEEDED\)' || true)
if [[ -n "$needed" ]]; then
    echo "FAIL $bin: has DT_NEEDED entries:" >&2
    while IFS= read -r line; do echo "    $line"; done <<<"$needed" >&2
    failed=1
fi

size=$(stat -c %s "$bin")
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
if strip -o "$tmp" "$bin" 2>/dev/null; then
    stripped=$(stat -c %s "$tmp")
else
    echo "check-static: strip could not process $bin; reporting its on-disk size" >&2
    stripped=$size
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

if [[ $failed -ne 0 ]]; then
    exit 1
fi
echo "OK   $bin: static ($elf_type), no PT_INTERP, no DT_NEEDED"
echo "size $bin: $size bytes on disk, $stripped bytes stripped ($(mib "$stripped")); target <= $max_bytes bytes ($(mib "$max_bytes"))"
if (( stripped > max_bytes )); then
    if (( enforce_size )); then
        echo "FAIL $bin: stripped size $stripped exceeds the target $max_bytes" >&2
        exit 1
    fi
    echo "WARN $bin: stripped size $stripped exceeds the target $max_bytes" >&2
fi
