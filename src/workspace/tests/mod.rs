//! Module-level adversarial tests on real files in temp dirs. Every wipe test plants its
//! traps, wipes, and checks that everything outside `workspace/` (sibling dirs standing for
//! the rest of the file system, the token, the records) is byte-for-byte unchanged.

mod records_tests;
mod seed_tests;
mod wipe_tests;

use super::{Owner, Volume, VolumeConfig};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub(super) const OWNER: Owner = Owner {
    uid: 1000,
    gid: 1000,
};

pub(super) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub(super) struct Fixture {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
    pub vol: Volume,
}

impl Fixture {
    pub fn ws(&self) -> PathBuf {
        self.root.join("workspace")
    }
    pub fn sup(&self) -> PathBuf {
        self.root.join(".supervisor")
    }
    pub fn cfg(&self) -> VolumeConfig {
        config(&self.root)
    }
    /// Reopens the volume (a supervisor restart).
    pub fn reopen(&mut self) {
        self.vol = Volume::open(&self.cfg()).expect("reopen volume").0;
    }
}

pub(super) fn config(root: &Path) -> VolumeConfig {
    VolumeConfig {
        root: root.to_path_buf(),
        owner: if is_root() {
            OWNER
        } else {
            Owner {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }
        },
        privileged: is_root(),
    }
}

/// A volume at `<tmp>/vol` and, beside it, `<tmp>/outside` holding a token file, a data
/// directory and a nested tree: the things a hostile workspace points at.
pub(super) fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("vol");
    std::fs::create_dir(&root).unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("data/nested")).unwrap();
    std::fs::write(outside.join("token"), b"eyJhbGciOi.secret-token.sig").unwrap();
    std::fs::write(outside.join("data/file1"), b"precious data 1").unwrap();
    std::fs::write(outside.join("data/nested/file2"), vec![7u8; 10_000]).unwrap();
    std::os::unix::fs::symlink("file1", outside.join("data/link-in-outside")).unwrap();
    let (vol, _) = Volume::open(&config(&root)).expect("open volume");
    std::fs::write(root.join(".supervisor/marker"), b"supervisor-private").unwrap();
    Fixture {
        tmp,
        root,
        outside,
        vol,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Snap {
    kind: &'static str,
    content: Vec<u8>,
    mode: u32,
    uid: u32,
    mtime: (i64, i64),
}

/// Everything under `base` except `workspace/`: content or link target, mode, owner, mtime.
pub(super) fn snapshot(base: &Path, skip: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    let mut stack = vec![base.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p == skip {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_symlink() {
            (
                "link",
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            ("dir", Vec::new())
        } else if ft.is_file() {
            ("file", std::fs::read(&p).unwrap())
        } else {
            ("other", Vec::new())
        };
        // Directory mtimes change when the records are rewritten; compare dir entries only.
        let mtime = if kind == "dir" {
            (0, 0)
        } else {
            (m.mtime(), m.mtime_nsec())
        };
        out.insert(
            p,
            Snap {
                kind,
                content,
                mode: m.permissions().mode(),
                uid: m.uid(),
                mtime,
            },
        );
    }
    out
}

pub(super) fn outside_snapshot(fx: &Fixture) -> BTreeMap<PathBuf, Snap> {
    snapshot(fx.tmp.path(), &fx.ws())
}

pub(super) fn assert_outside_unchanged(fx: &Fixture, before: &BTreeMap<PathBuf, Snap>) {
    let after = outside_snapshot(fx);
    for (path, snap) in before {
        let now = after
            .get(path)
            .unwrap_or_else(|| panic!("{} disappeared", path.display()));
        assert_eq!(now, snap, "{} changed", path.display());
    }
    for path in after.keys() {
        assert!(
            before.contains_key(path),
            "{} appeared outside the workspace",
            path.display()
        );
    }
}

pub(super) fn ws_entries(fx: &Fixture) -> Vec<PathBuf> {
    std::fs::read_dir(fx.ws())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

pub(super) fn assert_ws_empty(fx: &Fixture) {
    let left = ws_entries(fx);
    assert!(left.is_empty(), "workspace not empty: {left:?}");
    assert!(fx.ws().is_dir(), "workspace dir itself must remain");
}
