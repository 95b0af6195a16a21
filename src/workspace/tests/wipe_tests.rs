use super::super::flags::{immutable_action, FlagAction};
use super::super::fsutil::{self, Resolve};
use super::super::layout;
use super::super::wipe::{wipe_contents, WipeOptions, WipeReport};
use super::*;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::time::{Duration, Instant};

fn opts(openat2: bool, max_open_dirs: usize) -> WipeOptions {
    WipeOptions {
        resolve: Resolve {
            openat2,
            mount_ids: true,
        },
        max_open_dirs,
        can_clear_immutable: true,
        pending_budget: super::super::wipe::PENDING_BUDGET,
    }
}

fn wipe_with(fx: &Fixture, o: WipeOptions) -> WipeReport {
    let inner = &fx.vol.inner;
    let fd =
        layout::open_workspace(inner.root_fd.as_fd(), &inner.root_meta, &inner.root_s).unwrap();
    wipe_contents(fd, "workspace", o).unwrap()
}

/// Wipes the workspace through an fd opened on this thread: in a test's own mount
/// namespace an fd opened before `unshare` walks the old namespace's mounts and would
/// never meet the test's.
fn wipe_opened_here(fx: &Fixture, o: WipeOptions) -> Option<WipeReport> {
    let fd = nix::fcntl::open(
        &fx.ws(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    Some(wipe_contents(fd, "workspace", o).unwrap())
}

/// Both resolution modes: the kernel's `openat2` and the checked fallback (gVisor).
fn modes() -> Vec<bool> {
    if fsutil::openat2_available() {
        vec![true, false]
    } else {
        eprintln!("note: openat2 unavailable; testing the fallback only");
        vec![false]
    }
}

fn plant_symlinks(fx: &Fixture) {
    let ws = fx.ws();
    symlink("/", ws.join("to-root")).unwrap();
    symlink(&fx.outside, ws.join("to-outside")).unwrap();
    symlink(fx.outside.join("data"), ws.join("to-data")).unwrap();
    symlink(fx.sup().join("marker"), ws.join("to-record")).unwrap();
    symlink(fx.sup(), ws.join("to-supervisor")).unwrap();
    symlink(fx.outside.join("token"), ws.join("to-token")).unwrap();
    symlink("../../outside", ws.join("relative-escape")).unwrap();
    symlink("..", ws.join("dotdot")).unwrap();
    std::fs::create_dir_all(ws.join("deep/er")).unwrap();
    symlink(&fx.outside, ws.join("deep/er/to-outside")).unwrap();
    symlink("../../../../outside/data", ws.join("deep/er/rel")).unwrap();
    std::fs::write(ws.join("deep/er/plain"), b"tenant file").unwrap();
}

#[test]
fn symlink_traps_are_unlinked_never_followed() {
    for openat2 in modes() {
        let fx = fixture();
        plant_symlinks(&fx);
        let before = outside_snapshot(&fx);
        let report = wipe_with(&fx, opts(openat2, 128));
        assert!(report.fully_wiped, "{report:?}");
        assert_eq!(report.files_removed, 11, "{report:?}");
        assert_eq!(report.dirs_removed, 2);
        assert_outside_unchanged(&fx, &before);
        assert_ws_empty(&fx);
    }
}

#[test]
fn public_wipe_reports_and_keeps_workspace_dir() {
    let fx = fixture();
    std::fs::write(fx.ws().join("a"), vec![1u8; 1000]).unwrap();
    std::fs::create_dir(fx.ws().join("d")).unwrap();
    std::fs::write(fx.ws().join("d/b"), vec![1u8; 24]).unwrap();
    let allocated = allocated(&fx.ws().join("a")) + allocated(&fx.ws().join("d/b"));
    let report = fx.vol.wipe().unwrap();
    assert_eq!(report.files_removed, 2);
    assert_eq!(report.dirs_removed, 1);
    assert_eq!(report.bytes_removed, allocated);
    assert!(report.bytes_removed >= 1024, "{report:?}");
    assert!(report.fully_wiped);
    assert_ws_empty(&fx);
}

#[test]
fn hardlinks_to_outside_files_leave_the_outside_file_intact() {
    let fx = fixture();
    std::fs::hard_link(fx.outside.join("token"), fx.ws().join("hl-token")).unwrap();
    std::fs::create_dir(fx.ws().join("d")).unwrap();
    std::fs::hard_link(fx.outside.join("data/file1"), fx.ws().join("d/hl")).unwrap();
    let before = outside_snapshot(&fx);
    let report = fx.vol.wipe().unwrap();
    assert!(report.fully_wiped);
    assert_outside_unchanged(&fx, &before);
    assert_eq!(
        std::fs::metadata(fx.outside.join("token")).unwrap().nlink(),
        1
    );
    assert_ws_empty(&fx);
}

#[test]
fn fifos_sockets_devices_are_unlinked_without_opening() {
    let fx = fixture();
    let ws = fx.ws();
    nix::unistd::mkfifo(&ws.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    // A reader-less FIFO would block any open(); the wipe finishing at all proves none.
    let _listener = std::os::unix::net::UnixListener::bind(ws.join("sock")).unwrap();
    if is_root() {
        nix::sys::stat::mknod(
            &ws.join("chardev"),
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            libc::makedev(1, 3),
        )
        .unwrap();
    }
    let before = outside_snapshot(&fx);
    let report = fx.vol.wipe().unwrap();
    assert!(report.fully_wiped, "{report:?}");
    assert_eq!(report.files_removed, if is_root() { 3 } else { 2 });
    assert_outside_unchanged(&fx, &before);
    assert_ws_empty(&fx);
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).unwrap().blocks() * 512
}

/// A 1 TiB sparse file counts what it occupies, not its apparent size.
#[test]
fn sparse_files_count_allocated_bytes() {
    let fx = fixture();
    let f = std::fs::File::create(fx.ws().join("sparse")).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    std::fs::write(fx.ws().join("dense"), vec![7u8; 8192]).unwrap();
    let report = fx.vol.wipe().unwrap();
    assert!(report.fully_wiped, "{report:?}");
    assert_eq!(report.files_removed, 2);
    assert!(
        (8192..1 << 20).contains(&report.bytes_removed),
        "{report:?}"
    );
    assert_ws_empty(&fx);
}

/// A deep chain of wide directories with only 3 open fds: every level is closed and read
/// again from its start on the way back up; each entry is counted once, nothing is left.
#[test]
fn deep_and_wide_tree_is_counted_once_with_few_fds() {
    for openat2 in modes() {
        let fx = fixture();
        let mut dir = fx.ws();
        for level in 0..60 {
            dir = dir.join(format!("level-{level}"));
            std::fs::create_dir(&dir).unwrap();
            for i in 0..150 {
                std::fs::write(dir.join(format!("{i:04}-{}", "w".repeat(200))), b"x").unwrap();
            }
        }
        // A budget of about two batches: the shallower levels' batches are dropped and
        // read again from the start when the walk climbs back.
        let report = wipe_with(
            &fx,
            WipeOptions {
                pending_budget: 64 * 1024,
                ..opts(openat2, 3)
            },
        );
        assert!(
            report.fully_wiped,
            "{:?}",
            &report.skipped[..report.skipped.len().min(3)]
        );
        assert_eq!(report.files_removed, 60 * 150);
        assert_eq!(report.dirs_removed, 60);
        assert_ws_empty(&fx);
    }
}

/// An entry that cannot be removed at the bottom of a deep chain (fds closed on the way
/// down): reported once, never retried in a loop, and the rest of each level is removed.
#[test]
fn entry_left_deep_down_is_reported_once() {
    let fx = fixture();
    let mut dir = fx.ws();
    for level in 0..20 {
        dir = dir.join(format!("l{level}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("sibling"), b"x").unwrap();
    }
    std::fs::write(dir.join("imm"), b"x").unwrap();
    if chattr(&dir.join("imm"), fsutil::FS_IMMUTABLE_FL).is_none() {
        eprintln!(
            "skipped: cannot set the immutable flag here (file system or CAP_LINUX_IMMUTABLE)"
        );
        return;
    }
    let mut no_cap = opts(fsutil::openat2_available(), 2);
    no_cap.can_clear_immutable = false;
    let report = wipe_with(&fx, no_cap);
    unchattr(&dir.join("imm"));
    assert!(!report.fully_wiped);
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    assert!(
        report.skipped[0].0.ends_with("l19/imm"),
        "{:?}",
        report.skipped
    );
    assert_eq!(report.files_removed, 20);
    assert!(dir.join("imm").exists());
}

/// Builds a chain of `depth` directories named `d` (fd-relative: the path outgrows PATH_MAX).
fn make_deep(fx: &Fixture, depth: usize) {
    let mut fd = nix::fcntl::open(
        &fx.ws(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    for i in 0..depth {
        nix::sys::stat::mkdirat(fd.as_fd(), c"d", Mode::from_bits_truncate(0o755)).unwrap();
        if i % 1000 == 0 {
            let f = nix::fcntl::openat(
                fd.as_fd(),
                c"f",
                OFlag::O_CREAT | OFlag::O_WRONLY,
                Mode::from_bits_truncate(0o644),
            )
            .unwrap();
            drop(f);
        }
        fd = nix::fcntl::openat(
            fd.as_fd(),
            c"d",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
    nix::unistd::symlinkat(fx.outside.as_os_str(), fd.as_fd(), c"escape").unwrap();
}

#[test]
fn ten_thousand_deep_tree_with_bounded_fds() {
    for (openat2, max_open) in [(true, 128), (false, 16)] {
        if openat2 && !fsutil::openat2_available() {
            continue;
        }
        let fx = fixture();
        make_deep(&fx, 10_000);
        let before = outside_snapshot(&fx);
        let started = Instant::now();
        let report = wipe_with(&fx, opts(openat2, max_open));
        eprintln!(
            "10k-deep wipe (openat2={openat2}, max_open={max_open}): {:?}",
            started.elapsed()
        );
        assert!(
            report.fully_wiped,
            "{:?}",
            &report.skipped[..report.skipped.len().min(3)]
        );
        assert_eq!(report.dirs_removed, 10_000);
        assert_eq!(report.files_removed, 11);
        assert_outside_unchanged(&fx, &before);
        assert_ws_empty(&fx);
    }
}

// Creating 100k files takes 10-50 s in a debug build on a shared 2-core box (the wipe
// itself ~5 s); run with `cargo test --lib workspace:: -- --ignored`.
#[test]
#[ignore = "slow: creates 100,000 files (> 10 s in debug)"]
fn hundred_thousand_small_files() {
    let fx = fixture();
    let started = Instant::now();
    for d in 0..10 {
        let dir = fx.ws().join(format!("dir{d}"));
        std::fs::create_dir(&dir).unwrap();
        for i in 0..10_000 {
            std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
        }
    }
    eprintln!("created 100k files in {:?}", started.elapsed());
    let started = Instant::now();
    let report = fx.vol.wipe().unwrap();
    eprintln!("wiped 100k files in {:?}", started.elapsed());
    assert!(report.fully_wiped);
    assert_eq!(report.files_removed, 100_000);
    assert!(report.bytes_removed >= 100_000, "{report:?}");
    assert_ws_empty(&fx);
}

#[test]
fn mode_000_subtrees_and_read_only_dirs() {
    let fx = fixture();
    let ws = fx.ws();
    std::fs::create_dir_all(ws.join("locked/inner/deeper")).unwrap();
    std::fs::write(ws.join("locked/inner/deeper/f"), b"x").unwrap();
    std::fs::write(ws.join("locked/inner/g"), b"y").unwrap();
    std::fs::create_dir_all(ws.join("ro/sub")).unwrap();
    std::fs::write(ws.join("ro/sub/h"), b"z").unwrap();
    for (p, mode) in [
        ("locked/inner/deeper", 0o000),
        ("locked/inner", 0o000),
        ("locked", 0o000),
        ("ro/sub", 0o500),
        ("ro", 0o555),
    ] {
        std::fs::set_permissions(ws.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(ws.join("nomode"), b"q").unwrap();
    std::fs::set_permissions(ws.join("nomode"), std::fs::Permissions::from_mode(0o000)).unwrap();
    // The tenant also locked the workspace dir itself.
    std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o000)).unwrap();
    let report = fx.vol.wipe().unwrap();
    assert!(report.fully_wiped, "{report:?}");
    assert_eq!(report.files_removed, 4);
    assert_eq!(report.dirs_removed, 5);
    assert_ws_empty(&fx);
}

#[test]
fn file_held_open_is_removed() {
    let fx = fixture();
    std::fs::write(fx.ws().join("open"), b"still open").unwrap();
    let held = std::fs::File::open(fx.ws().join("open")).unwrap();
    let mut writer = std::fs::OpenOptions::new()
        .append(true)
        .open(fx.ws().join("open"))
        .unwrap();
    let report = fx.vol.wipe().unwrap();
    assert!(report.fully_wiped);
    assert_eq!(report.files_removed, 1);
    std::io::Write::write_all(&mut writer, b"more").unwrap();
    assert_ws_empty(&fx);
    drop(held);
}

#[test]
fn names_with_any_bytes() {
    let fx = fixture();
    let ws = fx.ws();
    let names: Vec<Vec<u8>> = vec![
        b"new\nline".to_vec(),
        b"\xff\xfe invalid utf8 \x80".to_vec(),
        vec![b'n'; 255],
        b"-rf".to_vec(),
        b" ".to_vec(),
        b"...".to_vec(),
        b"back\\slash\t".to_vec(),
    ];
    for n in &names {
        std::fs::write(ws.join(OsStr::from_bytes(n)), b"x").unwrap();
    }
    let dir = ws.join(OsStr::from_bytes(b"dir\nwith\xffnewline"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(OsStr::from_bytes(&[b'z'; 255])), b"x").unwrap();
    let before = outside_snapshot(&fx);
    let report = fx.vol.wipe().unwrap();
    assert!(report.fully_wiped, "{report:?}");
    assert_eq!(report.files_removed, names.len() as u64 + 1);
    assert_outside_unchanged(&fx, &before);
    assert_ws_empty(&fx);
    assert_eq!(fsutil::escape_bytes(b"a\nb\xff"), "a\\x0ab\\xff");
}

#[test]
fn immutable_decision_without_capability_fails_closed() {
    let imm = fsutil::FS_IMMUTABLE_FL;
    let app = fsutil::FS_APPEND_FL;
    assert_eq!(immutable_action(0x80000, false), FlagAction::NotFlagged);
    assert_eq!(immutable_action(0x80000, true), FlagAction::NotFlagged);
    assert_eq!(
        immutable_action(imm | 0x80000, false),
        FlagAction::FailClosed
    );
    assert_eq!(immutable_action(app, false), FlagAction::FailClosed);
    assert_eq!(
        immutable_action(imm | app | 0x80000, true),
        FlagAction::Clear(0x80000)
    );
}

/// Sets chattr flags on a path; `None` if the fs or our capabilities do not allow it.
fn chattr(path: &Path, flags: libc::c_int) -> Option<()> {
    let fd = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()).ok()?;
    let old = fsutil::get_inode_flags(fd.as_fd()).ok()?;
    fsutil::set_inode_flags(fd.as_fd(), old | flags).ok()
}

fn unchattr(path: &Path) {
    if let Ok(fd) = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()) {
        if let Ok(old) = fsutil::get_inode_flags(fd.as_fd()) {
            let _ = fsutil::set_inode_flags(
                fd.as_fd(),
                old & !(fsutil::FS_IMMUTABLE_FL | fsutil::FS_APPEND_FL),
            );
        }
    }
}

#[test]
fn immutable_and_append_only_entries() {
    let fx = fixture();
    let ws = fx.ws();
    std::fs::write(ws.join("imm"), b"x").unwrap();
    std::fs::write(ws.join("app"), b"y").unwrap();
    std::fs::create_dir(ws.join("immdir")).unwrap();
    std::fs::write(ws.join("immdir/child"), b"z").unwrap();
    if chattr(&ws.join("imm"), fsutil::FS_IMMUTABLE_FL).is_none() {
        eprintln!(
            "skipped: cannot set the immutable flag here (file system or CAP_LINUX_IMMUTABLE)"
        );
        return;
    }
    chattr(&ws.join("app"), fsutil::FS_APPEND_FL).unwrap();
    chattr(&ws.join("immdir"), fsutil::FS_IMMUTABLE_FL).unwrap();

    // Without the capability: fail closed, report, leave them.
    let mut no_cap = opts(fsutil::openat2_available(), 128);
    no_cap.can_clear_immutable = false;
    let report = wipe_with(&fx, no_cap);
    assert!(!report.fully_wiped);
    let skipped: Vec<&str> = report.skipped.iter().map(|(p, _)| p.as_str()).collect();
    for p in ["imm", "app", "immdir"] {
        assert!(
            skipped.contains(&p),
            "{p} not reported: {:?}",
            report.skipped
        );
    }
    assert!(
        report
            .skipped
            .iter()
            .all(|(_, why)| why.contains("CAP_LINUX_IMMUTABLE")),
        "{:?}",
        report.skipped
    );
    assert!(ws.join("imm").exists() && ws.join("app").exists() && ws.join("immdir/child").exists());

    // With it (we are root here): cleared and removed.
    let report = wipe_with(&fx, opts(fsutil::openat2_available(), 128));
    if !report.fully_wiped {
        for p in ["imm", "app", "immdir"] {
            unchattr(&ws.join(p));
        }
        panic!("wipe with CAP_LINUX_IMMUTABLE left entries: {report:?}");
    }
    assert_ws_empty(&fx);
}

#[test]
fn racing_directory_symlink_swap_never_escapes() {
    for openat2 in modes() {
        let fx = fixture();
        let before = outside_snapshot(&fx);
        let ws = fx.ws();
        let outside = fx.outside.clone();
        // At least 1.5 s and 50 swaps (a loaded CI box is slow), at most 10 s.
        let deadline = Instant::now() + Duration::from_millis(1500);
        let hard_deadline = Instant::now() + Duration::from_secs(10);
        // Same file system as the workspace, outside the snapshotted tree.
        let build = tempfile::tempdir_in(fx.tmp.path().parent().unwrap()).unwrap();
        let racer = {
            let ws = ws.clone();
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while (Instant::now() < deadline || swaps < 50) && Instant::now() < hard_deadline {
                    for name in ["d", "e"] {
                        let d = ws.join(name);
                        // Built beside the workspace and renamed in whole, so the wipe
                        // (which never sleeps) cannot starve the racer of directories.
                        let staged = build.path().join(name);
                        let _ = std::fs::create_dir_all(staged.join("sub"));
                        for i in 0..100 {
                            let _ = std::fs::write(staged.join(format!("f{i}")), b"tenant");
                            let _ =
                                std::fs::write(staged.join("sub").join(format!("g{i}")), b"tenant");
                        }
                        // Only this thread makes symlinks and it removes them before reuse.
                        if std::fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
                            let _ = std::fs::remove_file(&d);
                        }
                        let _ = std::fs::rename(&staged, &d);
                    }
                    // Swap as fast as possible while the wipe is busy inside.
                    for _ in 0..200 {
                        let mut any = false;
                        for name in ["d", "e"] {
                            let d = ws.join(name);
                            let real = ws.join(format!("{name}.real"));
                            if std::fs::rename(&d, &real).is_ok() {
                                let _ = symlink(&outside, &d);
                                std::thread::yield_now();
                                let _ = std::fs::remove_file(&d);
                                let _ = std::fs::rename(&real, &d);
                                swaps += 1;
                                any = true;
                            }
                            let sub = d.join("sub");
                            let sub_real = d.join("sub.real");
                            if std::fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir())
                                && std::fs::rename(&sub, &sub_real).is_ok()
                            {
                                let _ = symlink(outside.join("data"), &sub);
                                std::thread::yield_now();
                                let _ = std::fs::remove_file(&sub);
                                let _ = std::fs::rename(&sub_real, &sub);
                                swaps += 1;
                                any = true;
                            }
                        }
                        if !any {
                            break;
                        }
                    }
                }
                swaps
            })
        };
        let mut wipes = 0;
        while !racer.is_finished() {
            let _ = wipe_with(&fx, opts(openat2, 4));
            wipes += 1;
        }
        let swaps = racer.join().unwrap();
        eprintln!("race (openat2={openat2}): {wipes} wipes against {swaps} swaps");
        assert!(wipes > 1);
        assert!(swaps >= 20, "the racer must actually race ({swaps} swaps)");
        assert_outside_unchanged(&fx, &before);
        let report = wipe_with(&fx, opts(openat2, 128));
        assert!(report.fully_wiped, "{report:?}");
        assert_ws_empty(&fx);
    }
}

/// Runs `f` on a thread with its own mount namespace (so test mounts vanish with it).
fn in_private_mount_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        use nix::mount::{mount, MsFlags};
        if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_err() {
            return None;
        }
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .ok()?;
        Some(f())
    })
    .join()
    .ok()
    .flatten()
}

#[test]
fn bind_mounts_inside_the_workspace_are_skipped_and_reported() {
    if !is_root() {
        eprintln!("skipped: bind mounts need root");
        return;
    }
    for openat2 in modes() {
        let fx = fixture();
        let ws = fx.ws();
        std::fs::create_dir_all(ws.join("sub/mnt")).unwrap();
        std::fs::write(ws.join("sub/file"), b"x").unwrap();
        std::fs::write(ws.join("tokenmount"), b"").unwrap();
        std::fs::write(ws.join("plain"), b"x").unwrap();
        let before = outside_snapshot(&fx);
        let data = fx.outside.join("data");
        let token = fx.outside.join("token");
        let fx = std::sync::Arc::new(fx);
        let fx2 = fx.clone();
        let outcome = in_private_mount_ns(move || {
            use nix::mount::{mount, MsFlags};
            let ws = fx2.ws();
            let bind = MsFlags::MS_BIND;
            if mount(
                Some(&data),
                &ws.join("sub/mnt"),
                None::<&str>,
                bind,
                None::<&str>,
            )
            .is_err()
                || mount(
                    Some(&token),
                    &ws.join("tokenmount"),
                    None::<&str>,
                    bind,
                    None::<&str>,
                )
                .is_err()
            {
                return None;
            }
            wipe_opened_here(&fx2, opts(openat2, 128))
        });
        let Some(Some(report)) = outcome else {
            eprintln!("skipped: cannot create a mount namespace or bind mount here");
            return;
        };
        assert!(!report.fully_wiped);
        let mut mounts = report.skipped_mounts.clone();
        mounts.sort();
        assert_eq!(
            mounts,
            vec!["sub/mnt".to_owned(), "tokenmount".to_owned()],
            "{report:?}"
        );
        assert!(!ws.join("plain").exists() && !ws.join("sub/file").exists());
        // The namespace is gone with its thread: the mount points are plain entries again.
        assert_outside_unchanged(&fx, &before);
        let report = wipe_with(&fx, opts(openat2, 128));
        assert!(report.fully_wiped, "{report:?}");
        assert_ws_empty(&fx);
    }
}

/// A kernel without `openat2` and without mount ids (gVisor): a bind mount of the same
/// file system has the parent's `st_dev`, so only /proc/self/mountinfo tells it is a
/// mount point. It must be skipped before anything below it is touched.
#[test]
fn same_filesystem_bind_mount_is_never_descended_without_mount_ids() {
    if !is_root() {
        eprintln!("skipped: bind mounts need root");
        return;
    }
    let no_ids = WipeOptions {
        resolve: Resolve {
            openat2: false,
            mount_ids: false,
        },
        ..opts(false, 128)
    };
    let fx = fixture();
    let ws = fx.ws();
    std::fs::create_dir_all(ws.join("sub/mnt")).unwrap();
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/inner"), b"tenant").unwrap();
    std::fs::create_dir_all(ws.join("srcbind")).unwrap();
    std::fs::write(ws.join("tokenmount"), b"").unwrap();
    std::fs::write(ws.join("plain"), b"x").unwrap();
    let before = outside_snapshot(&fx);
    let data = fx.outside.join("data");
    let token = fx.outside.join("token");
    let fx = std::sync::Arc::new(fx);
    let fx2 = fx.clone();
    let outcome = in_private_mount_ns(move || {
        use nix::mount::{mount, MsFlags};
        let ws = fx2.ws();
        let bind = MsFlags::MS_BIND;
        for (from, to) in [
            (data.clone(), ws.join("sub/mnt")),
            (token.clone(), ws.join("tokenmount")),
            // A bind of a directory of the workspace itself: its source is tenant data
            // (wiped), its mount point is not descended.
            (ws.join("src"), ws.join("srcbind")),
        ] {
            mount(Some(&from), &to, None::<&str>, bind, None::<&str>).ok()?;
        }
        wipe_opened_here(&fx2, no_ids)
    });
    let Some(Some(report)) = outcome else {
        eprintln!("skipped: cannot create a mount namespace or bind mount here");
        return;
    };
    assert_outside_unchanged(&fx, &before);
    let mut mounts = report.skipped_mounts.clone();
    mounts.sort();
    assert_eq!(
        mounts,
        vec![
            "srcbind".to_owned(),
            "sub/mnt".to_owned(),
            "tokenmount".to_owned()
        ],
        "{report:?}"
    );
    assert!(!report.fully_wiped);
    assert!(report.skipped.is_empty(), "{report:?}");
    assert!(!ws.join("plain").exists() && !ws.join("src").exists());
    let report = wipe_with(&fx, no_ids);
    assert!(report.fully_wiped, "{report:?}");
    assert_ws_empty(&fx);
}

/// An overlay whose layers are on different file systems (here: the lower on the test's
/// disk, the upper on a tmpfs) gives directories the overlay's device and files their
/// layer's, as gVisor's overlay does. Files are tenant data, not mount points: all go,
/// and nothing is reported as a mount.
#[test]
fn overlay_files_with_their_layers_device_are_wiped() {
    if !is_root() {
        eprintln!("skipped: mounting an overlay needs root");
        return;
    }
    for mount_ids in [true, false] {
        let fx = fixture();
        let lower = fx.tmp.path().join("lower");
        std::fs::create_dir_all(lower.join("dir/sub")).unwrap();
        std::fs::write(lower.join("lowerfile"), b"lower").unwrap();
        std::fs::write(lower.join("dir/sub/deep"), b"lower").unwrap();
        let layers = fx.tmp.path().join("layers");
        std::fs::create_dir_all(&layers).unwrap();
        let before = outside_snapshot(&fx);
        let fx = std::sync::Arc::new(fx);
        let fx2 = fx.clone();
        let o = WipeOptions {
            resolve: Resolve {
                openat2: false,
                mount_ids,
            },
            ..opts(false, 128)
        };
        let outcome = in_private_mount_ns(move || {
            use nix::mount::{mount, MsFlags};
            mount(
                Some("tmpfs"),
                &layers,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .ok()?;
            std::fs::create_dir_all(layers.join("upper")).ok()?;
            std::fs::create_dir_all(layers.join("work")).ok()?;
            let data = format!(
                "lowerdir={},upperdir={},workdir={},xino=off",
                lower.display(),
                layers.join("upper").display(),
                layers.join("work").display()
            );
            let ws = fx2.ws();
            mount(
                Some("overlay"),
                &ws,
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .ok()?;
            std::fs::write(ws.join("upperfile"), b"upper").ok()?;
            std::fs::write(ws.join("dir/upper2"), b"upper").ok()?;
            std::os::unix::fs::symlink("/etc/passwd", ws.join("dir/link")).ok()?;
            use std::os::unix::fs::MetadataExt;
            let dir_dev = std::fs::symlink_metadata(ws.join("dir")).ok()?.dev();
            let file_dev = std::fs::symlink_metadata(ws.join("upperfile")).ok()?.dev();
            if dir_dev == file_dev {
                return Some(Err(
                    "this kernel's overlay gives files the directory's device",
                ));
            }
            let report = wipe_opened_here(&fx2, o)?;
            let left: Vec<_> = std::fs::read_dir(&ws)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .collect();
            Some(Ok((report, left)))
        });
        let (report, left) = match outcome {
            Some(Some(Ok(r))) => r,
            Some(Some(Err(why))) => {
                eprintln!("skipped: {why}");
                return;
            }
            _ => {
                eprintln!("skipped: cannot mount a tmpfs and an overlay in a mount namespace here");
                return;
            }
        };
        assert!(
            report.skipped_mounts.is_empty(),
            "mount_ids={mount_ids}: {report:?}"
        );
        assert!(report.fully_wiped, "mount_ids={mount_ids}: {report:?}");
        assert_eq!(report.files_removed, 5, "mount_ids={mount_ids}: {report:?}");
        assert!(left.is_empty(), "{left:?}");
        assert_outside_unchanged(&fx, &before);
    }
}
