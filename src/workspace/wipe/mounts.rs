//! Mount points below the wiped directory, from the mount table. A kernel with mount ids
//! (or `openat2`'s `RESOLVE_NO_XDEV`) tells a mount point by itself; gVisor has neither,
//! and a bind mount of the same file system has its parent's `st_dev`, so without the
//! table the walk would descend into it and delete what it shows. The table names mount
//! points by path; what is mounted at each is also remembered by device and inode, so a
//! mount point whose path changed since (a parent renamed) is still recognised, by the
//! inode, before anything below it is touched.

use super::super::fsutil::{self, Meta};
use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

pub(super) struct Mounts {
    /// The wiped directory's path as the kernel names it (`/proc/thread-self/fd/N`).
    root: Vec<u8>,
    /// Mount points below it when the wipe started, relative to it.
    paths: HashSet<Vec<u8>>,
    /// Most components of any of those paths (deeper entries need no path check).
    max_depth: usize,
    /// Device and inode of what is mounted at each (the mounted root).
    roots: HashSet<(u64, u64)>,
}

impl Mounts {
    /// The mount points below `root`; `None` when the mount table or the directory's
    /// own path cannot be read (the checks then rest on mount ids and `st_dev`).
    pub(super) fn load(root: BorrowedFd<'_>) -> Option<Mounts> {
        let root = fd_path(root)?;
        let mut paths = HashSet::new();
        let mut roots = HashSet::new();
        let mut max_depth = 0;
        for point in mount_points()? {
            let Some(rel) = below(&root, &point) else {
                continue;
            };
            max_depth = max_depth.max(rel.split(|b| *b == b'/').count());
            if let Ok(c) = CString::new(point) {
                // What stat sees at a mount point is the root of what is mounted there.
                if let Ok(m) = fsutil::stat_at(nix::fcntl::AT_FDCWD, &c) {
                    roots.insert((m.dev, m.ino));
                }
            }
            paths.insert(rel);
        }
        Some(Mounts {
            root,
            paths,
            max_depth,
            roots,
        })
    }

    /// Whether nothing is mounted below the wiped directory (no check needed).
    pub(super) fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub(super) fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// `rel` (relative to the wiped directory) was a mount point when the wipe started.
    pub(super) fn is_mount_path(&self, rel: &[u8]) -> bool {
        self.paths.contains(rel)
    }

    /// `meta` is the root of something mounted below the wiped directory: either a mount
    /// point (perhaps moved) or the source of a bind mount inside the workspace.
    pub(super) fn is_mounted_root(&self, meta: &Meta) -> bool {
        self.roots.contains(&(meta.dev, meta.ino))
    }

    /// Whether the directory open as `fd` is a mount point now: its current path is in
    /// the mount table read now (the source of a bind mount is not).
    pub(super) fn fd_is_mount_point(fd: BorrowedFd<'_>) -> bool {
        let (Some(path), Some(points)) = (fd_path(fd), mount_points()) else {
            // Cannot tell: never descend into what may be a mount.
            return true;
        };
        points.contains(&path)
    }

    /// For the final check: whether `rel` is listed as a mount point now (`None`: the
    /// table cannot be read).
    pub(super) fn listed_now(&self, rel: &[u8]) -> Option<bool> {
        let points = mount_points()?;
        Some(
            points
                .iter()
                .any(|p| below(&self.root, p).as_deref() == Some(rel)),
        )
    }
}

/// `point` relative to `root`, if strictly below it.
fn below(root: &[u8], point: &[u8]) -> Option<Vec<u8>> {
    let rest = if root == b"/" {
        point.strip_prefix(b"/")?
    } else {
        point.strip_prefix(root)?.strip_prefix(b"/")?
    };
    (!rest.is_empty()).then(|| rest.to_vec())
}

/// The path the kernel gives an open fd; `None` for a deleted or unreachable one.
fn fd_path(fd: BorrowedFd<'_>) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    let link = std::fs::read_link(format!("/proc/thread-self/fd/{}", fd.as_raw_fd()))
        .or_else(|_| std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())))
        .ok()?
        .into_os_string()
        .into_vec();
    (link.starts_with(b"/") && !link.ends_with(b" (deleted)")).then_some(link)
}

/// Every mount point of this thread's mount namespace (field 5 of mountinfo, unescaped).
fn mount_points() -> Option<Vec<Vec<u8>>> {
    let text = std::fs::read("/proc/thread-self/mountinfo")
        .or_else(|_| std::fs::read("/proc/self/mountinfo"))
        .ok()?;
    Some(parse_mount_points(&text))
}

pub(super) fn parse_mount_points(text: &[u8]) -> Vec<Vec<u8>> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .map(unescape)
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct.iter().fold(0u32, |a, b| a * 8 + u32::from(b - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped_and_taken_relative() {
        let text = b"36 35 98:0 /mnt1 /mnt/parent rw - ext3 /dev/root rw\n\
                     37 36 8:1 / /ws/a\\040b\\134c rw - ext4 /dev/sda1 rw\n\
                     38 36 8:1 /x /wsx rw - ext4 /dev/sda1 rw\n";
        let points = parse_mount_points(text);
        assert_eq!(points[1], b"/ws/a b\\c".to_vec());
        assert_eq!(below(b"/ws", &points[1]), Some(b"a b\\c".to_vec()));
        assert_eq!(
            below(b"/ws", &points[2]),
            None,
            "a sibling with the same prefix"
        );
        assert_eq!(below(b"/ws", b"/ws"), None, "the directory itself");
        assert_eq!(below(b"/", b"/proc"), Some(b"proc".to_vec()));
        assert_eq!(
            unescape(b"\\01"),
            b"\\01".to_vec(),
            "a short escape is literal"
        );
    }
}
