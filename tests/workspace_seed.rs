//! Seeding from hostile archives, end to end (issue 3): the real binary as PID 1 of a new
//! PID + mount namespace seeds from tar archives (plain, gzip, zstd) that try to write
//! outside the workspace; nothing escapes, nothing is committed, and a clean archive
//! still seeds the same volume afterwards.

mod common;

use common::workspace::*;
use common::*;
use std::time::Duration;

/// Hostile seed archives (`../`, absolute, a symlink then a file written through it, a
/// device node; plain, gzip and zstd): seeding fails with an error naming the entry, the
/// supervisor exits 70 before registering, and nothing is written outside staging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_seed_archives_fail_seeding_and_write_nothing_outside() {
    require!(can_unshare(), NEED);
    let env = Env::new("wsx-archive").await;
    plant_outside(&env);
    let d = env.dir.0.display().to_string();
    let abs = format!("{d}/abs-escape.txt");
    let through = format!("{d}/outside");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot.tar",
            tar(&[
                ("ok.txt", b'0', b"fine", ""),
                ("../../../escape.txt", b'0', b"escaped", ""),
            ]),
            "escape.txt",
        ),
        (
            "absolute.tar.gz",
            {
                let raw = tar(&[(abs.as_str(), b'0', b"escaped", "")]);
                let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
                std::io::Write::write_all(&mut gz, &raw).unwrap();
                gz.finish().unwrap()
            },
            "abs-escape.txt",
        ),
        (
            "through-symlink.tar.zst",
            zstd::encode_all(
                &tar(&[
                    ("link", b'2', b"", through.as_str()),
                    ("link/pwned.txt", b'0', b"through the link", ""),
                ])[..],
                3,
            )
            .unwrap(),
            "pwned.txt",
        ),
        (
            "device.tar",
            tar(&[("dir", b'5', b"", ""), ("dir/null", b'3', b"", "")]),
            "null",
        ),
    ];
    for (file, bytes, entry) in cases {
        let path = env.dir.0.join(file);
        std::fs::write(&path, bytes).unwrap();
        let outside = snapshot(&outside_roots(&env));
        let mut sup = spawn_with_archive(&env, &path);
        let code = sup.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(70), "{file}\n{}", sup.logs());
        let failed = event(&sup, "seed.failed").unwrap_or_else(|| panic!("{file}: {}", sup.logs()));
        let msg = failed["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(entry),
            "{file}: error does not name the entry: {msg}"
        );
        assert!(!sup.has_event("identity.parked"), "{}", sup.logs());
        // Nothing escaped: not next to the volume, not at the absolute path, not through
        // the link; the outside is byte-for-byte the same; no seed was committed.
        for p in [
            env.dir.0.join("escape.txt"),
            env.volume().join("escape.txt"),
            env.volume().join(".supervisor/escape.txt"),
            env.dir.0.join("abs-escape.txt"),
            env.dir.0.join("outside/pwned.txt"),
        ] {
            assert!(
                !path_exists_nofollow(&p),
                "{file}: {} was written",
                p.display()
            );
        }
        assert_unchanged(&outside, &snapshot(&outside_roots(&env)), file);
        assert_eq!(workspace_left(&env), Vec::<String>::new(), "{file}");
        assert!(
            !env.volume().join(".supervisor/seed.json").exists(),
            "{file}"
        );
        let mut top: Vec<_> = std::fs::read_dir(env.volume())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(top, [".supervisor", "workspace"], "{file}");
    }
    // A clean archive on the same volume still seeds afterwards (failures left no debris
    // that would block it).
    let good = env.dir.0.join("good.tar");
    std::fs::write(&good, tar(&[("hello.txt", b'0', b"hello", "")])).unwrap();
    let mut sup = spawn_with_archive(&env, &good);
    wait_event(&sup, Duration::from_secs(30), |e| {
        e["event"] == "identity.parked"
    })
    .await;
    assert_eq!(
        std::fs::read(env.volume().join("workspace/hello.txt")).unwrap(),
        b"hello"
    );
    sup.kill();
}
