# sandbox-supervisor image: FROM scratch, holding only the static binary at
# /sandbox-supervisor. It is made to be copied into sandbox images:
#
#     COPY --from=sandbox-supervisor:<version> /sandbox-supervisor /sandbox-supervisor
#     ENTRYPOINT ["/sandbox-supervisor", "run"]
#
# Two ways to build it:
#
#   1. With a registry (pulls the Rust image, builds inside it):
#          docker build -t sandbox-supervisor:dev .
#      (the last stage, `runtime`, is the default target)
#
#   2. From a binary built outside, no registry needed (how CI builds it):
#          scripts/build-static.sh                       # -> dist/sandbox-supervisor
#          docker build --target runtime-prebuilt \
#              --build-arg BINARY=dist/sandbox-supervisor -t sandbox-supervisor:dev .
#      BINARY is a path inside the build context; .dockerignore lets only
#      dist/sandbox-supervisor through from dist/ (target/ is excluded whole).
#
# Stage order matters: the legacy builder (DOCKER_BUILDKIT=0) builds every stage up to
# the --target in file order, so the prebuilt stages come first and never depend on the
# builder stage; `--target runtime-prebuilt` then pulls nothing. BuildKit builds only
# the stages the target needs, so the order is harmless there.

# Global ARG (must precede the first FROM to be usable in a FROM line); see builder.
ARG RUST_IMAGE=rust:1.95.0-bookworm

# Shared by both runtime variants: labels and entrypoint, no files.
FROM scratch AS runtime-base
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="sandbox-supervisor" \
      org.opencontainers.image.description="PID-1 supervisor for Kubernetes agent sandboxes pre-started in warm pools; copy /sandbox-supervisor into your sandbox image" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# The supervisor runs as root: it must own .supervisor/ records, read the 0400 token and
# drop the workload to the sandbox user. It never runs tenant code as root.
ENTRYPOINT ["/sandbox-supervisor", "run"]

# Runtime from a binary built outside (scripts/build-static.sh). COPY keeps the file's
# mode from the context (0755 from cargo); --chmod would need BuildKit.
FROM runtime-base AS runtime-prebuilt
ARG BINARY=dist/sandbox-supervisor
COPY ${BINARY} /sandbox-supervisor

# Builder, for users with a registry. Pinned by tag; pin the digest as well where you
# can resolve it (no registry is reachable where this file is tested, so no digest is
# written here rather than an unverified one):
#     docker buildx imagetools inspect rust:1.95.0-bookworm   # -> sha256:...
#     docker build --build-arg RUST_IMAGE=rust:1.95.0-bookworm@sha256:... .
# The gnu target with crt-static needs only what the image already has (gcc, glibc's
# static libs, binutils), and it is the same recipe the prebuilt path uses, so the
# binary CI tests is the binary this stage makes. (A musl build works too, but needs
# musl-tools for the C parts of zstd and ring, and musl's allocator is slower under
# tokio's thread pool.)
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN scripts/build-static.sh /out/sandbox-supervisor

# Default target: runtime from the builder.
FROM runtime-base AS runtime
COPY --from=builder /out/sandbox-supervisor /sandbox-supervisor
