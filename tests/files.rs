//! File streams end to end (issue 14): the real binary as PID 1, the real relay, the
//! reference gateway's file driver. Writes and reads across relay drops, confinement
//! against a tenant racing symlink swaps, permissions, hostile files, limits.

mod common;

use common::workspace::tar;
use common::*;
use rand::{RngCore, SeedableRng};
use sandbox_supervisor::gateway::link::FaultyLink;
use sandbox_supervisor::gateway::WriteOptions;
use sandbox_supervisor::proto::{ErrorCode, FileType};
use sha2::{Digest, Sha256};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".ssv-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_operations_round_trip() {
    let env = Env::new("files-ops").await;
    let (_sup, sb) = env.bound(launch()).await;
    let ws = env.volume().join("workspace");

    let info = sb.mkdir("a/b/c", 0o750, true).await.unwrap();
    assert_eq!(info.r#type, FileType::Directory as i32);
    assert_eq!(info.mode, 0o750);
    let r = sb
        .write_file(
            "a/b/c/hello.txt",
            b"hello\n".to_vec(),
            WriteOptions {
                mode: 0o600,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.bytes, 6);
    assert_eq!(r.sha256, hex::encode(Sha256::digest(b"hello\n")));
    let on_disk = ws.join("a/b/c/hello.txt");
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hello\n");
    assert_eq!(
        std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    if is_root() {
        // Created with the sandbox user's identity, not root's.
        assert_ne!(std::fs::metadata(&on_disk).unwrap().uid(), 0);
    }
    // Exists: refused unless replace.
    let e = sb
        .write_file("a/b/c/hello.txt", b"x".to_vec(), WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyExists, "{e:?}");
    // A wrong expected digest leaves the old file untouched.
    let e = sb
        .write_file(
            "a/b/c/hello.txt",
            b"new".to_vec(),
            WriteOptions {
                replace: true,
                expect_sha256: Some("00".repeat(32)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    assert!(e.message.contains("expected"), "{e:?}");
    assert_eq!(std::fs::read(&on_disk).unwrap(), b"hello\n");
    assert!(temp_files(&ws.join("a/b/c")).is_empty());

    assert_eq!(sb.read_file("a/b/c/hello.txt").await.unwrap(), b"hello\n");
    let st = sb.stat("a/b/c/hello.txt").await.unwrap();
    assert_eq!((st.size, st.r#type), (6, FileType::File as i32));
    assert_eq!(sb.stat("nope").await.unwrap_err().code, ErrorCode::NotFound);

    // Paginated list, byte order.
    for i in 0..25 {
        sb.write_file(
            &format!("list/f{i:02}"),
            vec![b'x'; i],
            WriteOptions {
                create_parents: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    std::os::unix::fs::symlink("/etc/passwd", ws.join("list/zlink")).unwrap();
    let all = sb.list("list", 7).await.unwrap();
    let names: Vec<_> = all.iter().map(|e| e.name.clone()).collect();
    let mut want: Vec<_> = (0..25).map(|i| format!("f{i:02}")).collect();
    want.push("zlink".into());
    assert_eq!(names, want);
    let link = all.last().unwrap();
    assert_eq!(
        (link.r#type, link.symlink_target.as_str()),
        (FileType::Symlink as i32, "/etc/passwd")
    );

    sb.rename("list/f00", "list/g00", false).await.unwrap();
    let e = sb.rename("list/f01", "list/f02", false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyExists, "{e:?}");
    sb.rename("list/f01", "list/f02", true).await.unwrap();
    assert!(!ws.join("list/f01").exists());

    // Remove: a symlink (never its target), a non-empty dir needs recursive.
    sb.remove("list/zlink", false).await.unwrap();
    assert!(Path::new("/etc/passwd").exists());
    let e = sb.remove("list", false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    let r = sb.remove("list", true).await.unwrap();
    assert!(r.entry_count >= 24, "{r:?}");
    assert!(!ws.join("list").exists());
}

/// 256 MiB up and down, byte-identical, while the relay is cut 10 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_survive_ten_relay_drops() {
    let mib = env_usize("SSV_FILE_MIB", 256);
    let env = Env::new("files-big").await;
    let link = std::sync::Arc::new(FaultyLink::start(env.gateway.local_addr()).await.unwrap());
    let (sup, sb) = env
        .bound_via(&env.endpoint_at(link.local_addr().port()), launch(), &[])
        .await;
    let data = random(mib << 20, 14);
    let want = hex::encode(Sha256::digest(&data));

    let cutter = {
        let link = link.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                link.cut_all();
            }
        })
    };
    let r = sb
        .write_file("big.bin", data.clone(), WriteOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", sup.logs()));
    assert_eq!(r.sha256, want);
    assert_eq!(r.bytes, data.len() as u64);
    let back = sb.read_file("big.bin").await.unwrap();
    cutter.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(hex::encode(Sha256::digest(&back)), want);
    let ws = env.volume().join("workspace");
    assert_eq!(
        hex::encode(Sha256::digest(std::fs::read(ws.join("big.bin")).unwrap())),
        want
    );
    assert!(temp_files(&ws).is_empty());
    let drops = sup
        .events()
        .iter()
        .filter(|e| e["event"] == "file.write_interrupted")
        .count();
    eprintln!("write interrupted {drops} times");
}

/// A write the gateway abandons mid-way leaves no file (or the old one untouched) and,
/// past the resume window, no temporary file either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_leaves_nothing_in_place() {
    let env = Env::new("files-cut").await;
    let (sup, sb) = env
        .bound_with(launch(), &["--file-resume-window", "1s"])
        .await;
    let ws = env.volume().join("workspace");
    sb.write_file("keep.txt", b"old\n".to_vec(), WriteOptions::default())
        .await
        .unwrap();
    for (path, replace) in [("fresh.bin", false), ("keep.txt", true)] {
        let sb2 = sb.clone();
        let task = tokio::spawn(async move {
            sb2.write_file(
                path,
                random(64 << 20, 1),
                WriteOptions {
                    replace,
                    ..Default::default()
                },
            )
            .await
        });
        // Wait until bytes arrived, then give up (the stream is reset).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while temp_files(&ws).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!temp_files(&ws).is_empty(), "the write never started");
        task.abort();
        let _ = task.await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            temp_files(&ws).is_empty(),
            "temporary file left: {:?}\n{}",
            temp_files(&ws),
            sup.logs()
        );
    }
    assert!(!ws.join("fresh.bin").exists());
    assert_eq!(std::fs::read(ws.join("keep.txt")).unwrap(), b"old\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confinement_and_permissions() {
    let env = Env::new("files-perm").await;
    let (_sup, sb) = env.bound_with(launch(), &["--max-file-size", "1M"]).await;
    let ws = env.volume().join("workspace");

    let e = sb.read_file("/etc/passwd").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
    assert!(
        e.message.contains("absolute path outside the workspace"),
        "{e:?}"
    );
    let e = sb
        .read_file("../.supervisor/binding.json")
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
    assert!(e.message.contains("'..'"), "{e:?}");
    let e = sb
        .write_file("x/../../escape", b"x".to_vec(), WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");

    // A symlink component, and a symlink leaf, are never followed.
    let outside = TempDir::new("files-outside");
    std::fs::write(outside.0.join("secret"), "secret\n").unwrap();
    std::os::unix::fs::symlink(&outside.0, ws.join("out")).unwrap();
    std::os::unix::fs::symlink(outside.0.join("secret"), ws.join("leaf")).unwrap();
    let e = sb.read_file("out/secret").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    assert!(e.message.contains("symbolic link"), "{e:?}");
    let e = sb.read_file("leaf").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
    assert!(e.message.contains("symbolic link"), "{e:?}");
    let e = sb
        .write_file("out/new", b"x".to_vec(), WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    let e = sb.remove("out/secret", false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    assert!(outside.0.join("secret").exists() && !outside.0.join("new").exists());

    // A FIFO is refused at once (never opened, so never blocks).
    nix::unistd::mkfifo(
        &ws.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), sb.read_file("fifo"))
        .await
        .expect("blocked on a FIFO")
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
    assert!(e.message.contains("FIFO"), "{e:?}");

    // The size limit: announced size and streamed bytes.
    let e = sb
        .write_file("huge", vec![0u8; (1 << 20) + 1], WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e:?}");
    assert!(e.message.contains("--max-file-size"), "{e:?}");
    // A huge sparse file reads back in bounded frames (only its start is checked here).
    let sparse = std::fs::File::create(ws.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    let back = sb.read_file("sparse").await.unwrap();
    assert_eq!(back.len(), 8 << 20);
    assert!(back.iter().all(|b| *b == 0));

    if is_root() {
        // A root-owned directory: the kernel refuses the sandbox user.
        std::fs::create_dir(ws.join("rootdir")).unwrap();
        std::fs::set_permissions(ws.join("rootdir"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        nix::unistd::chown(&ws.join("rootdir"), Some(0.into()), Some(0.into())).unwrap();
        let e = sb
            .write_file("rootdir/f", b"x".to_vec(), WriteOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
        assert!(e.message.contains("sandbox user"), "{e:?}");
        assert!(std::fs::read_dir(ws.join("rootdir"))
            .unwrap()
            .next()
            .is_none());
        // A root-only file cannot be read either.
        std::fs::write(ws.join("rootdir/secret"), "s").unwrap();
        std::fs::set_permissions(
            ws.join("rootdir/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let e = sb.read_file("rootdir/secret").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
    } else {
        eprintln!("skipping the root-owned directory checks: not root");
    }
}

/// A tenant keeps swapping a directory component for a symlink to a directory outside
/// the workspace while 1,000 writes, reads and removes run: nothing outside is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_swapping_symlinks_cannot_redirect_operations() {
    let n = env_usize("SSV_FILE_RACE_OPS", 1000);
    let env = Env::new("files-race").await;
    let (_sup, sb) = env.bound(launch()).await;
    let ws = env.volume().join("workspace");
    let outside = TempDir::new("files-race-out");
    std::fs::set_permissions(&outside.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    for i in 0..n {
        std::fs::write(outside.0.join(format!("r{i}")), "outside\n").unwrap();
        std::fs::set_permissions(
            outside.0.join(format!("r{i}")),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
    }
    std::fs::write(outside.0.join("canary"), "outside\n").unwrap();
    sb.mkdir("d", 0o777, false).await.unwrap();
    for i in 0..n {
        sb.write_file(
            &format!("d/r{i}"),
            b"inside\n".to_vec(),
            WriteOptions::default(),
        )
        .await
        .unwrap();
    }
    let script = format!(
        "cd {ws}; while true; do mv d d.real 2>/dev/null; ln -s {out} d 2>/dev/null; rm -f d; mv d.real d 2>/dev/null; done",
        ws = ws.display(),
        out = outside.0.display()
    );
    let swapper = sb.exec(sh(&script)).await.unwrap();
    let before: Vec<_> = {
        let mut v: Vec<_> = std::fs::read_dir(&outside.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let (mut ok, mut failed) = (0, 0);
    for i in 0..n {
        let r = match i % 3 {
            0 => sb
                .write_file(&format!("d/w{i}"), b"w\n".to_vec(), WriteOptions::default())
                .await
                .map(drop),
            1 => sb
                .read_file(&format!("d/r{i}"))
                .await
                .map(|b| assert_eq!(b, b"inside\n", "op {i} read outside")),
            _ => sb.remove(&format!("d/r{i}"), false).await.map(drop),
        };
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                assert!(
                    matches!(e.code, ErrorCode::NotFound | ErrorCode::FailedPrecondition),
                    "op {i}: unexpected {e:?}"
                );
                assert!(e.message.contains("d/"), "op {i}: imprecise {e:?}");
                failed += 1;
            }
        }
    }
    swapper.signal(libc::SIGKILL).await.ok();
    let after: Vec<_> = {
        let mut v: Vec<_> = std::fs::read_dir(&outside.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(before, after, "something was created or removed outside");
    for e in std::fs::read_dir(&outside.0).unwrap() {
        assert_eq!(std::fs::read(e.unwrap().path()).unwrap(), b"outside\n");
    }
    eprintln!("{ok} operations succeeded inside, {failed} failed cleanly");
    assert!(
        ok > 0 && failed > 0,
        "the race never happened ({ok} ok, {failed} failed)"
    );
}

/// The seed's hostile archives are refused through upload the same way (naming the
/// entry), nothing is written outside or left in place; good archives extract and a
/// directory download round-trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_upload_and_download() {
    let env = Env::new("files-tar").await;
    let (_sup, sb) = env.bound(launch()).await;
    let ws = env.volume().join("workspace");
    let outside = TempDir::new("files-tar-out");
    std::fs::set_permissions(&outside.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let abs = format!("{}/abs-escape.txt", outside.0.display());
    let through = outside.0.display().to_string();
    let gz = |raw: Vec<u8>| {
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        gz.finish().unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tar(&[
                ("ok.txt", b'0', b"fine", ""),
                ("../../../escape.txt", b'0', b"escaped", ""),
            ]),
            "escape.txt",
        ),
        (
            "absolute",
            gz(tar(&[(abs.as_str(), b'0', b"escaped", "")])),
            "abs-escape.txt",
        ),
        (
            "through-symlink",
            zstd::encode_all(
                &tar(&[
                    ("link", b'2', b"", through.as_str()),
                    ("link/pwned.txt", b'0', b"x", ""),
                ])[..],
                3,
            )
            .unwrap(),
            "pwned.txt",
        ),
        (
            "device",
            tar(&[("dir", b'5', b"", ""), ("dir/null", b'3', b"", "")]),
            "null",
        ),
    ];
    sb.mkdir("up", 0, false).await.unwrap();
    for (name, bytes, entry) in cases {
        let e = sb.upload_tar("up", bytes, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{name}: {e:?}");
        assert!(
            e.message.contains(entry),
            "{name}: error does not name the entry: {e:?}"
        );
        assert_eq!(
            std::fs::read_dir(ws.join("up")).unwrap().count(),
            0,
            "{name}: something left in place"
        );
        assert_eq!(
            std::fs::read_dir(&outside.0).unwrap().count(),
            0,
            "{name}: written outside"
        );
        assert!(!ws.join("escape.txt").exists() && !env.volume().join("escape.txt").exists());
    }

    // A good archive, gzip then zstd.
    let good = || {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o640);
        b.append_data(&mut h, "proj/src/a.txt", &b"alpha"[..])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "proj/link", "src/a.txt").unwrap();
        b.into_inner().unwrap()
    };
    let r = sb.upload_tar("up/gz", gz(good()), true).await.unwrap();
    assert!(r.entry_count >= 2, "{r:?}");
    assert_eq!(
        std::fs::read(ws.join("up/gz/proj/src/a.txt")).unwrap(),
        b"alpha"
    );
    assert_eq!(
        std::fs::read_link(ws.join("up/gz/proj/link")).unwrap(),
        Path::new("src/a.txt")
    );
    sb.upload_tar("up/zst", zstd::encode_all(&good()[..], 3).unwrap(), true)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(ws.join("up/zst/proj/src/a.txt")).unwrap(),
        b"alpha"
    );
    // The same names again: refused, nothing overwritten.
    let e = sb.upload_tar("up/zst", good(), false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AlreadyExists, "{e:?}");
    assert!(temp_files(&ws.join("up/zst")).is_empty());

    // Download round trip: files, links as links, FIFOs skipped.
    nix::unistd::mkfifo(
        &ws.join("up/gz/proj/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let tarball = sb.download_tar("up/gz").await.unwrap();
    let mut seen = Vec::new();
    for e in tar::Archive::new(&tarball[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut body).unwrap();
        let link = e.link_name().unwrap().map(|l| l.display().to_string());
        seen.push((path, body, link));
    }
    assert!(
        seen.contains(&("proj/src/a.txt".into(), b"alpha".to_vec(), None)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("proj/link".into(), vec![], Some("src/a.txt".into()))),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|(p, _, _)| p.contains("fifo")), "{seen:?}");
}
