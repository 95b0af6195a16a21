//! Workspace benchmark (DESIGN §8): seed of 10k files / 200 MB against `cp -a`, wipe of
//! 100k small files against `rm -rf`, measured in the same run on the same file system.
//!
//! ```text
//! cargo run --release --example workspace_bench -- <scratch-dir> [--runs N] [--small]
//! ```
//!
//! `<scratch-dir>` must be on the file system to measure (it is filled and emptied).
//! `--small` shrinks the trees (500 files / 5 MB, 5k files) for a quick check. The seed
//! time includes the `syncfs` the seed does before writing its record, so `cp -a` is also
//! shown followed by `sync -f` (the fair baseline for a durable copy).

use sandbox_supervisor::workspace::{Owner, SeedSource, Volume, VolumeConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Sizes {
    seed_files: usize,
    seed_bytes: usize,
    wipe_files: usize,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut runs = 3usize;
    let mut small = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--small" => small = true,
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            other => dir = Some(PathBuf::from(other)),
        }
    }
    let Some(base) = dir else {
        anyhow::bail!("usage: workspace_bench <scratch-dir> [--runs N] [--small]");
    };
    let sizes = if small {
        Sizes {
            seed_files: 500,
            seed_bytes: 5 << 20,
            wipe_files: 5_000,
        }
    } else {
        Sizes {
            seed_files: 10_000,
            seed_bytes: 200 << 20,
            wipe_files: 100_000,
        }
    };
    let runs = runs.max(1);
    std::fs::create_dir_all(&base)?;
    let base = base.canonicalize()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let src = base.join("seed-src");
    make_seed_source(&src, sizes.seed_files, sizes.seed_bytes)?;

    let (mut seed_t, mut cp_t, mut cp_sync_t) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let root = base.join(format!("vol-{run}"));
        std::fs::create_dir_all(&root)?;
        let (vol, _) = Volume::open(&config(&root))?;
        let t = Instant::now();
        rt.block_on(vol.seed(&SeedSource::Directory(src.clone())))?;
        seed_t.push(t.elapsed());
        drop(vol);
        rm_rf(&root)?;

        let dst = base.join(format!("cp-{run}"));
        let t = Instant::now();
        run_cmd(Command::new("cp").arg("-a").arg(&src).arg(&dst))?;
        cp_t.push(t.elapsed());
        run_cmd(Command::new("sync").arg("-f").arg(&dst))?;
        cp_sync_t.push(t.elapsed());
        rm_rf(&dst)?;
    }

    let (mut wipe_t, mut rm_t) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let root = base.join(format!("wvol-{run}"));
        std::fs::create_dir_all(&root)?;
        let (vol, _) = Volume::open(&config(&root))?;
        make_small_files(&vol.workspace_dir(), sizes.wipe_files)?;
        let t = Instant::now();
        let report = vol.wipe()?;
        wipe_t.push(t.elapsed());
        anyhow::ensure!(report.fully_wiped, "wipe incomplete: {report:?}");
        drop(vol);
        rm_rf(&root)?;

        let dst = base.join(format!("rm-{run}"));
        make_small_files(&dst, sizes.wipe_files)?;
        let t = Instant::now();
        rm_rf(&dst)?;
        rm_t.push(t.elapsed());
    }
    rm_rf(&src)?;

    println!("| what | ours (median of {runs}) | baseline | baseline time | ratio | target |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let seed_label = format!(
        "seed {} files / {} MB",
        sizes.seed_files,
        sizes.seed_bytes >> 20
    );
    row(&seed_label, &mut seed_t, "cp -a", &mut cp_t, "<= 1.0x");
    row(
        &seed_label,
        &mut seed_t,
        "cp -a + sync -f",
        &mut cp_sync_t,
        "<= 1.0x",
    );
    let wipe_label = format!("wipe {} files", sizes.wipe_files);
    row(&wipe_label, &mut wipe_t, "rm -rf", &mut rm_t, "<= 1.2x");
    Ok(())
}

fn config(root: &Path) -> VolumeConfig {
    let privileged = nix::unistd::geteuid().is_root();
    VolumeConfig {
        root: root.to_path_buf(),
        owner: if privileged {
            Owner {
                uid: 1000,
                gid: 1000,
            }
        } else {
            Owner {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }
        },
        privileged,
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn row(what: &str, ours: &mut [Duration], base: &str, theirs: &mut [Duration], target: &str) {
    let (a, b) = (median(ours), median(theirs));
    println!(
        "| {what} | {:.1} ms | {base} | {:.1} ms | {:.2}x | {target} |",
        a.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        a.as_secs_f64() / b.as_secs_f64().max(1e-9)
    );
}

/// `files` files in 100 directories (10 levels of nesting for some), sizes varying
/// around the mean so the total is `bytes`, plus a few symlinks.
fn make_seed_source(dir: &Path, files: usize, bytes: usize) -> anyhow::Result<()> {
    if dir.exists() {
        rm_rf(dir)?;
    }
    let mean = bytes / files.max(1);
    let mut written = 0usize;
    for i in 0..files {
        let sub = dir.join(format!("d{:02}/n{}", i % 100, (i / 100) % 10));
        if i < 1000 {
            std::fs::create_dir_all(&sub)?;
        }
        // Sizes between 0.5x and 1.5x of the mean; the last file takes the remainder.
        let size = if i + 1 == files {
            bytes.saturating_sub(written)
        } else {
            mean / 2 + (i * 7919) % mean.max(1)
        };
        let content: Vec<u8> = (0..size)
            .map(|k| (k as u8).wrapping_mul(31) ^ (i as u8))
            .collect();
        std::fs::write(sub.join(format!("f{i}")), content)?;
        written += size;
    }
    for i in 0..10 {
        std::os::unix::fs::symlink(format!("d{:02}", i), dir.join(format!("link{i}")))?;
    }
    Ok(())
}

fn make_small_files(dir: &Path, files: usize) -> anyhow::Result<()> {
    for i in 0..files {
        let sub = dir.join(format!("d{}", i % 100));
        if i < 100 {
            std::fs::create_dir_all(&sub)?;
        }
        std::fs::write(sub.join(format!("f{i}")), b"small file content\n")?;
    }
    Ok(())
}

fn rm_rf(p: &Path) -> anyhow::Result<()> {
    run_cmd(Command::new("rm").arg("-rf").arg(p))
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status()?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}
