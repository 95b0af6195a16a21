//! The thin binary: parse, set up PID-1 duties before any thread exists, run.

use clap::Parser;
use sandbox_supervisor::config::{Cli, Command, LogFormat, ProbeKind};
use sandbox_supervisor::lifecycle::exit;
use sandbox_supervisor::telemetry::logs;
use std::io::IsTerminal;

/// Makes the runtime start `n` blocking-pool threads now (each task waits until all
/// are running at once).
async fn prestart_blocking_threads(n: usize) {
    let all = std::sync::Arc::new(std::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let all = all.clone();
            tokio::task::spawn_blocking(move || {
                all.wait();
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::CONFIG } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match cli.command {
        Command::Version => {
            println!("sandbox-supervisor {}", sandbox_supervisor::config::VERSION);
            0
        }
        Command::Probe(p) => {
            let path = match p.which {
                ProbeKind::Live => "/livez",
                ProbeKind::Ready => "/readyz",
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(sandbox_supervisor::telemetry::probe(
                p.addr, path, p.timeout,
            )) {
                Ok(line) => {
                    println!("{line}");
                    0
                }
                Err(e) => {
                    eprintln!("probe failed: {e}");
                    1
                }
            }
        }
        #[cfg(feature = "reference-gateway")]
        Command::Local(args) => sandbox_supervisor::local::main(args),
        #[cfg(not(feature = "reference-gateway"))]
        Command::Local(_) => {
            eprintln!("sandbox-supervisor: this build has no reference gateway, so `local` is unavailable; build with the default features (cargo run -- local)");
            exit::CONFIG
        }
        Command::Run(cfg) => {
            // Logging and the flags first: a bad flag exits 64 naming it, before any
            // PID-1 set-up can fail for an unrelated reason. Neither makes a thread.
            let format = match cfg.log_format {
                LogFormat::Json => logs::Format::Json,
                LogFormat::Text => logs::Format::Text,
                LogFormat::Auto if std::io::stderr().is_terminal() => logs::Format::Text,
                LogFormat::Auto => logs::Format::Json,
            };
            if let Err(e) = logs::init(format, &cfg.log_level) {
                eprintln!("sandbox-supervisor: {e}");
                std::process::exit(exit::CONFIG);
            }
            if let Err(e) = cfg.validate() {
                tracing::error!(event = "config.invalid", error = %e, "{e}");
                std::process::exit(exit::CONFIG);
            }
            // Block signals and become subreaper before the runtime creates threads.
            let pid1 = match sandbox_supervisor::pid1::prepare() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(event = "pid1.failed", error = %e, "{e}");
                    std::process::exit(exit::FATAL);
                }
            };
            // The tenant can fill the pids limit, and then no thread can be created:
            // every thread the supervisor needs exists before any tenant does. The
            // blocking pool's are started here and never retire; when tokio cannot add
            // one it queues the work on them (it panics only when it has none).
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(cfg.worker_threads))
                .max_blocking_threads(8)
                .thread_keep_alive(std::time::Duration::from_secs(u64::from(u32::MAX)))
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(prestart_blocking_threads(2));
            rt.block_on(sandbox_supervisor::lifecycle::run_command(*cfg, pid1))
        }
    };
    std::process::exit(code);
}
