use super::super::{BootState, SeedError, SeedSource};
use super::*;
use std::io::{Read, Write};
use std::os::unix::fs::symlink;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A source tree with modes, symlinks (relative, absolute, dangling), hardlinks, an empty
/// file, a read-only directory and odd names.
fn make_source(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("private/deep")).unwrap();
    std::fs::create_dir_all(dir.join("ro")).unwrap();
    std::fs::write(dir.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(dir.join("README"), vec![b'r'; 300_000]).unwrap();
    std::fs::write(dir.join("private/deep/secret"), b"s").unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("ro/file"), b"ro").unwrap();
    std::fs::write(dir.join(OsStr::from_bytes(b"odd\nname\xff")), b"odd").unwrap();
    std::fs::hard_link(dir.join("README"), dir.join("README.hardlink")).unwrap();
    symlink("bin/tool", dir.join("tool-link")).unwrap();
    symlink("/etc/passwd", dir.join("abs-link")).unwrap();
    symlink("nowhere", dir.join("dangling")).unwrap();
    for (p, mode) in [
        ("bin/tool", 0o755),
        ("private/deep/secret", 0o600),
        ("private", 0o700),
        ("ro", 0o555),
        ("README", 0o644),
    ] {
        std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

use std::ffi::OsStr;

fn check_seeded_tree(fx: &Fixture) {
    let ws = fx.ws();
    let mode = |p: &str| {
        std::fs::symlink_metadata(ws.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        std::fs::read(ws.join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(mode("bin/tool"), 0o755);
    assert_eq!(mode("private"), 0o700);
    assert_eq!(mode("private/deep/secret"), 0o600);
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(std::fs::read(ws.join("README")).unwrap().len(), 300_000);
    assert_eq!(std::fs::read(ws.join("empty")).unwrap().len(), 0);
    assert_eq!(
        std::fs::read(ws.join(OsStr::from_bytes(b"odd\nname\xff"))).unwrap(),
        b"odd"
    );
    assert_eq!(
        std::fs::read_link(ws.join("tool-link")).unwrap(),
        Path::new("bin/tool")
    );
    assert_eq!(
        std::fs::read_link(ws.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(ws.join("dangling")).unwrap(),
        Path::new("nowhere")
    );
    let a = std::fs::metadata(ws.join("README")).unwrap();
    let b = std::fs::metadata(ws.join("README.hardlink")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hardlinks preserved");
    let ws_meta = std::fs::metadata(&ws).unwrap();
    assert_eq!(ws_meta.permissions().mode() & 0o7777, 0o750);
    if is_root() {
        for p in [
            "",
            "bin",
            "bin/tool",
            "tool-link",
            "private/deep/secret",
            "ro/file",
        ] {
            let m = std::fs::symlink_metadata(ws.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (OWNER.uid, OWNER.gid), "owner of {p:?}");
        }
    }
    let rec = std::fs::symlink_metadata(fx.sup().join("seed.json")).unwrap();
    assert_eq!(rec.permissions().mode() & 0o7777, 0o600);
    assert!(no_staging(fx));
}

fn no_staging(fx: &Fixture) -> bool {
    std::fs::read_dir(fx.sup())
        .unwrap()
        .all(|e| !e.unwrap().file_name().as_bytes().starts_with(b"staging-"))
}

#[test]
fn directory_seed_is_faithful_and_runs_once() {
    let mut fx = fixture();
    let src = fx.tmp.path().join("src");
    make_source(&src);
    let rt = runtime();
    let rec = rt
        .block_on(fx.vol.seed(&SeedSource::Directory(src.clone())))
        .unwrap();
    assert_eq!(rec.files, 7);
    assert_eq!(rec.symlinks, 3);
    assert_eq!(rec.dirs, 4);
    assert_eq!(rec.bytes, 300_000 + 18 + 1 + 2 + 3);
    assert!(rec.digest.starts_with("sha256:") && rec.digest.len() == 71);
    assert_eq!(rec.source, format!("directory:{}", src.display()));
    check_seeded_tree(&fx);
    // Same source again: the tree digest is a pure function of the content.
    // A restart finds the record and skips.
    fx.reopen();
    std::fs::write(src.join("new-file"), b"n").unwrap();
    let again = rt
        .block_on(fx.vol.seed(&SeedSource::Directory(src)))
        .unwrap();
    assert_eq!(again, rec);
    assert!(!fx.ws().join("new-file").exists());
    assert!(matches!(fx.vol.boot_state(None).unwrap(), BootState::Seeded(r) if r == rec));
}

#[test]
fn directory_seed_rejects_device_nodes() {
    if !is_root() {
        eprintln!("skipped: mknod needs root");
        return;
    }
    let fx = fixture();
    let src = fx.tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("ok"), b"x").unwrap();
    nix::sys::stat::mknod(
        &src.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        libc::makedev(1, 3),
    )
    .unwrap();
    let err = runtime()
        .block_on(fx.vol.seed(&SeedSource::Directory(src)))
        .unwrap_err();
    assert!(
        matches!(&err, SeedError::Entry { entry, problem } if entry == "null" && problem.contains("device")),
        "{err}"
    );
    assert_ws_empty(&fx);
    assert!(no_staging(&fx));
    assert!(!fx.sup().join("seed.json").exists());
}

/// A tar of `src` with relative paths; `README.hardlink` as a hardlink entry.
fn tar_of(src: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(src.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let child = rel.join(&n);
            let full = src.join(&child);
            if n == "README.hardlink" {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Link);
                h.set_path(&child).unwrap();
                h.set_link_name("README").unwrap();
                h.set_mode(0o644);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
                continue;
            }
            b.append_path_with_name(&full, &child).unwrap();
            if std::fs::symlink_metadata(&full).unwrap().is_dir() {
                stack.push(child);
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn archives_plain_gzip_zstd_by_magic_and_same_digest() {
    let src_fx = fixture();
    let src = src_fx.tmp.path().join("src");
    make_source(&src);
    let dir_digest = runtime()
        .block_on(src_fx.vol.seed(&SeedSource::Directory(src.clone())))
        .unwrap()
        .digest;
    let tar = tar_of(&src);
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("plain.tgz", tar.clone()),
        ("gzip.tar", gzip(&tar)),
        ("zstd.gz", zstd::encode_all(tar.as_slice(), 3).unwrap()),
    ];
    for (name, bytes) in variants {
        let fx = fixture();
        let path = fx.tmp.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let rec = runtime()
            .block_on(fx.vol.seed(&SeedSource::Archive(path)))
            .unwrap();
        check_seeded_tree(&fx);
        assert_eq!(rec.digest, dir_digest, "{name}: same tree, same digest");
        use sha2::Digest;
        assert_eq!(
            rec.source_sha256,
            Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&bytes))
            ))
        );
    }
}

/// Writes one entry with a raw name (the tar crate's safe setters refuse hostile paths).
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            gnu.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    if matches!(kind, tar::EntryType::Char) {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

#[test]
fn hostile_archives_are_rejected_with_nothing_written() {
    type Plant = fn(&mut tar::Builder<Vec<u8>>, &[u8]);
    let cases: Vec<(&str, &str, Plant)> = vec![
        ("dotdot", "..", |b, _| {
            raw_entry(b, b"../escaped", tar::EntryType::Regular, None, b"evil")
        }),
        ("nested dotdot", "..", |b, _| {
            raw_entry(
                b,
                b"a/../../escaped",
                tar::EntryType::Regular,
                None,
                b"evil",
            )
        }),
        ("absolute", "absolute", |b, o| {
            let mut p = o.to_vec();
            p.extend_from_slice(b"/escaped");
            raw_entry(b, &p, tar::EntryType::Regular, None, b"evil")
        }),
        (
            "write through symlink",
            "written through the symlink",
            |b, o| {
                raw_entry(b, b"ok", tar::EntryType::Regular, None, b"fine");
                raw_entry(b, b"l", tar::EntryType::Symlink, Some(o), b"");
                raw_entry(b, b"l/escaped", tar::EntryType::Regular, None, b"evil")
            },
        ),
        (
            "write through symlink dir entry",
            "written through the symlink",
            |b, o| {
                raw_entry(b, b"l", tar::EntryType::Symlink, Some(o), b"");
                raw_entry(b, b"l/sub/", tar::EntryType::Directory, None, b"")
            },
        ),
        ("device node", "device", |b, _| {
            raw_entry(b, b"null", tar::EntryType::Char, None, b"")
        }),
        ("fifo", "FIFO", |b, _| {
            raw_entry(b, b"pipe", tar::EntryType::Fifo, None, b"")
        }),
        ("hardlink to absolute outside", "absolute", |b, o| {
            let mut t = o.to_vec();
            t.extend_from_slice(b"/../outside/token");
            raw_entry(b, b"h", tar::EntryType::Link, Some(&t), b"")
        }),
        ("hardlink with dotdot", "..", |b, _| {
            raw_entry(
                b,
                b"h",
                tar::EntryType::Link,
                Some(b"../outside/token"),
                b"",
            )
        }),
        (
            "hardlink to a non-seed file",
            "not a regular file earlier",
            |b, _| raw_entry(b, b"h", tar::EntryType::Link, Some(b"etc/passwd"), b""),
        ),
        (
            "hardlink via a symlink",
            "not a regular file earlier",
            |b, o| {
                raw_entry(b, b"l", tar::EntryType::Symlink, Some(o), b"");
                raw_entry(b, b"h", tar::EntryType::Link, Some(b"l"), b"")
            },
        ),
        ("duplicate entry", "appears twice", |b, _| {
            raw_entry(b, b"f", tar::EntryType::Regular, None, b"one");
            raw_entry(b, b"f", tar::EntryType::Regular, None, b"two")
        }),
    ];
    for (label, expect, plant) in cases {
        let fx = fixture();
        let target = fx.outside.join("data");
        let mut b = tar::Builder::new(Vec::new());
        plant(&mut b, target.as_os_str().as_bytes());
        let bytes = b.into_inner().unwrap();
        let path = fx.tmp.path().join("hostile.tar");
        std::fs::write(&path, gzip(&bytes)).unwrap();
        let before = outside_snapshot(&fx);
        let err = runtime()
            .block_on(fx.vol.seed(&SeedSource::Archive(path)))
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SeedError::Entry { .. }), "{label}: {msg}");
        assert!(msg.contains(expect), "{label}: `{msg}` lacks `{expect}`");
        assert_outside_unchanged(&fx, &before);
        assert!(!fx.tmp.path().join("escaped").exists(), "{label}");
        assert!(!fx.outside.join("data/escaped").exists(), "{label}");
        assert_ws_empty(&fx);
        assert!(no_staging(&fx), "{label}: staging left behind");
        assert!(!fx.sup().join("seed.json").exists());
        assert_eq!(fx.vol.boot_state(None).unwrap(), BootState::Fresh);
    }
}

#[test]
fn garbage_archive_is_a_clear_error() {
    let fx = fixture();
    let path = fx.tmp.path().join("garbage.tar.gz");
    std::fs::write(&path, [0x1f, 0x8b, 0, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let err = runtime()
        .block_on(fx.vol.seed(&SeedSource::Archive(path)))
        .unwrap_err();
    assert!(matches!(err, SeedError::Archive { .. }), "{err}");
    assert_ws_empty(&fx);
    assert!(no_staging(&fx));
}

#[test]
fn interrupted_seed_is_discarded_and_redone() {
    let fx = fixture();
    // A crash after the rename but before the record: staging dir present, content in place.
    std::fs::create_dir_all(fx.sup().join("staging-0123456789abcdef/tree/half")).unwrap();
    std::fs::write(
        fx.sup().join("staging-0123456789abcdef/tree/half/f"),
        b"partial",
    )
    .unwrap();
    std::fs::write(fx.ws().join("stale-seed-file"), b"from the first attempt").unwrap();
    std::fs::create_dir(fx.ws().join("stale-dir")).unwrap();
    assert_eq!(fx.vol.boot_state(None).unwrap(), BootState::Fresh);
    let src = fx.tmp.path().join("src");
    make_source(&src);
    let rec = runtime()
        .block_on(fx.vol.seed(&SeedSource::Directory(src)))
        .unwrap();
    assert_eq!(rec.files, 7);
    assert!(!fx.ws().join("stale-seed-file").exists() && !fx.ws().join("stale-dir").exists());
    check_seeded_tree(&fx);
}

#[test]
fn finished_seed_with_leftover_staging_skips_and_cleans() {
    let fx = fixture();
    let rec = runtime().block_on(fx.vol.seed(&SeedSource::None)).unwrap();
    std::fs::create_dir_all(fx.sup().join("staging-00000000000000aa/tree")).unwrap();
    let again = runtime().block_on(fx.vol.seed(&SeedSource::None)).unwrap();
    assert_eq!(rec, again);
    assert!(no_staging(&fx));
}

#[test]
fn seed_refuses_unexplained_content() {
    let fx = fixture();
    std::fs::write(fx.ws().join("who-put-this"), b"?").unwrap();
    let err = runtime()
        .block_on(fx.vol.seed(&SeedSource::None))
        .unwrap_err();
    assert!(matches!(err, SeedError::NotEmpty { .. }), "{err}");
    assert!(fx.ws().join("who-put-this").exists());
}

/// Serves `body` once per connection on 127.0.0.1 for `n` connections.
fn serve(body: Vec<u8>, n: usize) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    (
        format!("http://127.0.0.1:{}/seed.tar.gz?token=secret", addr.port()),
        handle,
    )
}

#[test]
fn url_seed_with_pinned_sha256() {
    use sha2::Digest;
    let fx = fixture();
    let src = fx.tmp.path().join("src");
    make_source(&src);
    let body = gzip(&tar_of(&src));
    let sha = hex::encode(sha2::Sha256::digest(&body));

    // Wrong digest: error, nothing in the workspace, no staging, no record.
    let (url, h) = serve(body.clone(), 1);
    let wrong = SeedSource::Url {
        timeouts: Default::default(),
        url: url.clone(),
        sha256: "0".repeat(64),
        ca_file: None,
    };
    let err = runtime().block_on(fx.vol.seed(&wrong)).unwrap_err();
    h.join().unwrap();
    assert!(
        matches!(&err, SeedError::Digest { actual, .. } if actual.ends_with(&sha)),
        "{err}"
    );
    assert!(
        !err.to_string().contains("secret"),
        "query string leaked: {err}"
    );
    assert_ws_empty(&fx);
    assert!(no_staging(&fx));
    assert!(!fx.sup().join("seed.json").exists());

    // Right digest (with the sha256: prefix, upper case): seeded.
    let (url, h) = serve(body, 1);
    let good = SeedSource::Url {
        timeouts: Default::default(),
        url,
        sha256: format!("sha256:{}", sha.to_uppercase()),
        ca_file: None,
    };
    let rec = runtime().block_on(fx.vol.seed(&good)).unwrap();
    h.join().unwrap();
    check_seeded_tree(&fx);
    assert_eq!(rec.source_sha256, Some(format!("sha256:{sha}")));
    assert!(
        rec.source.starts_with("url:http://127.0.0.1:") && !rec.source.contains("secret"),
        "{}",
        rec.source
    );
}

#[test]
fn url_rules() {
    use super::super::fetch::{check_url, parse_sha256};
    assert!(check_url("https://example.com/seed.tar").is_ok());
    assert!(check_url("http://127.0.0.1:8080/x").is_ok());
    assert!(check_url("http://[::1]/x").is_ok());
    assert!(check_url("http://localhost/x").is_ok());
    assert!(
        matches!(check_url("http://example.com/x"), Err(SeedError::Config(m)) if m.contains("https"))
    );
    assert!(check_url("ftp://example.com/x").is_err());
    assert!(parse_sha256("abc").is_err());
    assert_eq!(
        parse_sha256(&format!("sha256:{}", "A".repeat(64))).unwrap(),
        "a".repeat(64)
    );
}

/// A server that sends its headers, then one byte every 100 ms, forever (never idle long
/// enough for the idle timeout): only the total timeout ends the download.
fn trickle() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n");
        for _ in 0..100 {
            if s.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    format!("http://user:pw@127.0.0.1:{port}/slow.tar?sig=secret")
}

#[test]
fn url_seed_is_bounded_by_the_total_timeout_and_names_it() {
    let fx = fixture();
    let slow = SeedSource::Url {
        url: trickle(),
        sha256: "0".repeat(64),
        ca_file: None,
        timeouts: crate::workspace::SeedTimeouts {
            connect: std::time::Duration::from_secs(5),
            idle: std::time::Duration::from_secs(5),
            total: std::time::Duration::from_millis(800),
        },
    };
    let started = std::time::Instant::now();
    let err = runtime()
        .block_on(fx.vol.seed(&slow))
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert!(
        err.contains("--seed-timeout") && err.contains("800ms") && err.contains("/slow.tar"),
        "{err}"
    );
    assert!(!err.contains("secret") && !err.contains("pw@"), "{err}");
    assert_ws_empty(&fx);
    assert!(no_staging(&fx));
}

#[test]
fn a_stopped_seed_is_cancelled_and_leaves_no_staging() {
    let fx = fixture();
    let slow = SeedSource::Url {
        url: trickle(),
        sha256: "0".repeat(64),
        ca_file: None,
        timeouts: Default::default(),
    };
    let started = std::time::Instant::now();
    let stop = async { tokio::time::sleep(std::time::Duration::from_millis(300)).await };
    let err = runtime()
        .block_on(fx.vol.seed_until(&slow, stop))
        .unwrap_err();
    assert!(matches!(err, SeedError::Cancelled), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert_ws_empty(&fx);
    assert!(no_staging(&fx));
    assert!(!fx.sup().join("seed.json").exists());
}

#[test]
fn a_fifo_as_seed_archive_is_refused_naming_it() {
    let fx = fixture();
    let fifo = fx.tmp.path().join("seed.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = runtime()
        .block_on(fx.vol.seed(&SeedSource::Archive(fifo)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("seed.fifo") && err.contains("FIFO"), "{err}");
    assert_ws_empty(&fx);
    assert!(no_staging(&fx));
}
