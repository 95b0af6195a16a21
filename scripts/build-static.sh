#!/usr/bin/env bash
# Build the fully static release binary that goes into images, on the gnu target of this
# machine (no musl toolchain needed), copy it to dist/sandbox-supervisor, prove it static
# and print its size. The Dockerfile's builder stage runs this same script, so the image
# built with a registry and the one CI builds from a prebuilt binary use one recipe.
#
# Usage: scripts/build-static.sh [output-path]   (default: dist/sandbox-supervisor;
#        a relative path is taken from the repository root)
#   TARGET=<gnu triple>  the Rust target (default: this host's, e.g. x86_64-unknown-linux-gnu)
# Then:  docker build --target runtime-prebuilt --build-arg BINARY=dist/sandbox-supervisor \
#            -t sandbox-supervisor:dev .
# Needs: the Rust toolchain for a *-linux-gnu target, gcc and glibc's
# static libraries (Debian: libc6-dev), binutils (for the check).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
target=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
case "$target" in
    *-linux-gnu) ;;
    *) echo "build-static: target '$target' is not a *-linux-gnu target; crt-static is only set up for gnu here" >&2; exit 2 ;;
esac
out=${1:-dist/sandbox-supervisor}

# Run from a test (tests/docker.rs builds the binary it puts in a container), this
# script inherits what `cargo test` sets for the test process. ring's build script
# reruns when CARGO_MANIFEST_DIR changes, which would rebuild most of the release tree
# on every alternation between a shell and a test run: drop the per-package variables
# so both build the same thing. (CARGO_HOME, CARGO_TARGET_DIR, CARGO_BUILD_*, ... stay.)
unset CARGO_MANIFEST_DIR CARGO_MANIFEST_PATH CARGO_CRATE_NAME CARGO_PRIMARY_PACKAGE \
    CARGO_TARGET_TMPDIR CARGO_RUSTC_CURRENT_DIR OUT_DIR
while IFS= read -r var; do
    unset "$var"
done < <(compgen -e | grep -E '^CARGO_(PKG|BIN)_' || true)

# --target is explicit on purpose: with it, RUSTFLAGS apply to the final binary only and
# not to build scripts and proc macros, which cannot be linked with crt-static.
# crt-static on the gnu target yields a static-pie executable: no loader, no libc.so.
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --release --locked --no-default-features --target "$target" --bin sandbox-supervisor

built="${CARGO_TARGET_DIR:-target}/$target/release/sandbox-supervisor"
mkdir -p "$(dirname "$out")"
# cp to a temp name then rename, so a concurrent docker build never sees half a file.
cp "$built" "$out.tmp"
mv -f "$out.tmp" "$out"

# Hold the size (a regression fails the build): DESIGN's 8 MiB. (7.53 MiB once the log
# filter stopped pulling in a regex engine; it had grown to 8.29 MiB with the channels.)
CHECK_STATIC_MAX_BYTES=${CHECK_STATIC_MAX_BYTES:-8388608} \
    "$repo/scripts/check-static.sh" --enforce-size "$out"
echo "built $out ($(stat -c %s "$out") bytes)"
