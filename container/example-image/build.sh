#!/usr/bin/env bash
# Build the example sandbox image from a static supervisor binary, without a registry.
#
# Usage: container/example-image/build.sh <supervisor-binary> [tag]   (tag: sandbox-example:dev)
#   e.g. scripts/build-static.sh && container/example-image/build.sh dist/sandbox-supervisor
#   BUSYBOX=/path/to/static/busybox   passed to make-rootfs.sh
# Then: docker run --rm --entrypoint /bin/sh sandbox-example:dev -c 'id sandbox; ls /opt/sandbox/seed'
# Needs: docker, tar, binutils (readelf, strip), and what make-rootfs.sh needs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 <supervisor-binary> [tag]" >&2
    exit 2
fi
binary=$1
tag=${2:-sandbox-example:dev}

# A dynamic binary would build fine and then fail at start with a bare "no such file or
# directory" (no loader in the image): refuse it here instead.
"$repo/scripts/check-static.sh" "$binary"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
"$here/make-rootfs.sh" "$ctx/rootfs"
# Reproducible: fixed order, owners and times, so the same inputs give the same layer.
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 \
    -C "$ctx/rootfs" -cf "$ctx/rootfs.tar" .
install -m 0755 "$binary" "$ctx/sandbox-supervisor"
cp "$here/Dockerfile" "$ctx/Dockerfile"

# BuildKit needs the buildx plugin, which this engine's packages lack; the legacy
# builder is enough for a FROM scratch image. Honour an explicit DOCKER_BUILDKIT.
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build \
    --label "org.opencontainers.image.title=sandbox-example" \
    --label "org.opencontainers.image.description=Example sandbox image with sandbox-supervisor as PID 1" \
    -t "$tag" "$ctx"
echo "built $tag"
