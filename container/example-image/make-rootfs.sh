#!/usr/bin/env bash
# Make the example sandbox image's base root filesystem locally, with no registry: a
# static busybox as the whole userland, the sandbox user, and the seed directory.
#
# Usage: container/example-image/make-rootfs.sh <rootfs-dir>
#   The directory must not exist yet (or be empty). build.sh packs it into the image.
#   BUSYBOX=/path/to/static/busybox   use this binary instead of finding one
#
# Where busybox comes from, first that works:
#   1. $BUSYBOX;
#   2. /bin/busybox, if it is static (Debian's busybox-static installs it there);
#   3. `apt-get download busybox-static` (Debian's package), unpacked with dpkg-deb;
#      if the package lists are missing and we are root, `apt-get update` once first.
# Needs: readelf (binutils); for 3: apt-get and dpkg-deb.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $# -ne 1 ]]; then
    echo "usage: $0 <rootfs-dir>" >&2
    exit 2
fi
root=$1
if [[ -e "$root" ]] && [[ -n "$(ls -A "$root")" ]]; then
    echo "make-rootfs: $root exists and is not empty; give a new directory" >&2
    exit 2
fi

is_static() {
    # A static busybox is required: the image has no libc for a dynamic one to load.
    ! LC_ALL=C readelf -lW "$1" 2>/dev/null | grep -qE '^[[:space:]]*INTERP[[:space:]]' &&
        LC_ALL=C readelf -hW "$1" >/dev/null 2>&1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

busybox=""
if [[ -n "${BUSYBOX:-}" ]]; then
    if ! is_static "$BUSYBOX"; then
        echo "make-rootfs: BUSYBOX=$BUSYBOX is not a static ELF binary" >&2
        exit 1
    fi
    busybox=$BUSYBOX
elif [[ -x /bin/busybox ]] && is_static /bin/busybox; then
    busybox=/bin/busybox
else
    download() { (cd "$work" && apt-get download busybox-static) >"$work/apt.log" 2>&1; }
    if ! download; then
        if [[ $(id -u) -eq 0 ]]; then
            echo "make-rootfs: apt-get download failed; running apt-get update once" >&2
            apt-get update -qq >"$work/update.log" 2>&1 || cat "$work/update.log" >&2
            download || { cat "$work/apt.log" >&2; echo "make-rootfs: cannot download busybox-static" >&2; exit 1; }
        else
            cat "$work/apt.log" >&2
            echo "make-rootfs: cannot download busybox-static (run apt-get update, or set BUSYBOX=)" >&2
            exit 1
        fi
    fi
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/pkg"
    busybox="$work/pkg/bin/busybox"
    if ! is_static "$busybox"; then
        echo "make-rootfs: the downloaded busybox-static is not static?" >&2
        exit 1
    fi
fi
echo "make-rootfs: busybox from $busybox ($("$busybox" | head -1))"

umask 022
mkdir -p "$root"
cd "$root"
mkdir -p bin sbin usr/bin usr/sbin etc root tmp proc sys dev opt/sandbox sandbox
install -m 0755 "$busybox" bin/busybox

# One symlink per applet, at the path busybox itself reports (bin/sh, usr/bin/env, ...),
# pointing at /bin/busybox: the full userland (sh, cat, ls, sleep, echo, env, id, stty,
# tty, ...) with one binary.
count=0
while IFS= read -r applet; do
    # linuxrc (no directory) is busybox's initrd init; nothing here boots a kernel.
    [[ -z "$applet" || "$applet" == bin/busybox || "$applet" != */* ]] && continue
    [[ -e "$applet" || -L "$applet" ]] && continue
    mkdir -p "$(dirname "$applet")"
    ln -s /bin/busybox "$applet"
    count=$((count + 1))
done < <("$busybox" --list-full)
for must in bin/sh bin/cat bin/ls bin/sleep bin/echo usr/bin/env usr/bin/id bin/stty usr/bin/tty; do
    if [[ ! -L "$must" ]]; then
        echo "make-rootfs: this busybox has no '$must' applet" >&2
        exit 1
    fi
done

# Users. The supervisor runs as root (uid 0) and drops every workload process to the
# sandbox user, uid/gid 1000 by default (--sandbox-user sandbox). Its home is the
# workspace, where sessions start.
cat >etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/sandbox/workspace:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >etc/group <<'GROUP'
root:x:0:
sandbox:x:1000:
nogroup:x:65534:
GROUP
# Only files: the static supervisor resolves the sandbox user through glibc's built-in
# files backend, and there is no other NSS module in this image to load.
cat >etc/nsswitch.conf <<'NSS'
passwd: files
group: files
hosts: files dns
NSS
chmod 0644 etc/passwd etc/group etc/nsswitch.conf
chmod 0700 root
chmod 1777 tmp
# /sandbox is the workspace volume's mount point; the supervisor creates workspace/ and
# .supervisor/ on the volume at boot. Root-owned 0755 like the layout wants it.
chmod 0755 sandbox

# The seed: baked-in content copied into /sandbox/workspace once, before any tenant
# exists (--seed-dir, default /opt/sandbox/seed). Modes are kept; the supervisor chowns
# the copies to the sandbox user.
cp -R "$here/seed" opt/sandbox/seed
find opt/sandbox/seed -type d -exec chmod 0755 {} +
find opt/sandbox/seed -type f ! -perm -u+x -exec chmod 0644 {} +
find opt/sandbox/seed -type f -perm -u+x -exec chmod 0755 {} +

echo "make-rootfs: $root ready: busybox + $count applet links, users root/sandbox(1000), seed $(find opt/sandbox/seed -type f | wc -l) files"
