//! The pool bench's tables and PerfKitBenchmarker sample lines, from its JSON report.

use super::{ms, Value};

pub fn print_report(report: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!(
        "\n# pool scale: {} ({} cores), binary {}, launch {}, heartbeat {} ms",
        report["cpu"].as_str().unwrap_or(""),
        report["cores"],
        report["binary"].as_str().unwrap_or(""),
        report["launch"].as_str().unwrap_or(""),
        report["heartbeat_ms"]
    );
    println!("\n| parked | RSS / pod | private | shared | PSS | idle CPU / min / pod (stat) | (schedstat) | gateway CPU / min / parked pod |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let kib = |v: &Value| format!("{:.0} KiB", f(v));
    for i in report["idle"].as_array().into_iter().flatten() {
        println!(
            "| {} supervisors | {} | {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            i["n"],
            kib(&i["rss_kib"]),
            kib(&i["private_kib"]),
            kib(&i["shared_kib"]),
            kib(&i["pss_kib"]),
            f(&i["cpu_ms_per_min_stat"]),
            f(&i["cpu_ms_per_min_sched"]),
            f(&i["gateway_cpu_ms_per_min_per_pod"])
        );
        if let Some(t) = i.get("tini") {
            println!(
                "| tini (same window) | {} | {} | {} | {} | {:.2} ms | {:.2} ms | — |",
                kib(&t["rss_kib"]),
                kib(&t["private_kib"]),
                kib(&t["shared_kib"]),
                kib(&t["pss_kib"]),
                f(&t["cpu_ms_per_min_stat"]),
                f(&t["cpu_ms_per_min_sched"])
            );
        }
    }
    println!("\n| N parked | K target | claims | submitted/s | sustained/s | activation → bound p50 / p99 / max (ms) | → exit of /bin/true p50 / p99 / max (ms) | supervisor bind p50 / p99 (ms) | peak in flight | failures |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let three = |v: &Value| {
        format!(
            "{} / {} / {}",
            ms(f(&v["p50"])),
            ms(f(&v["p99"])),
            ms(f(&v["max"]))
        )
    };
    for s in report["storms"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} / {} | {} | {} |",
            s["n"],
            s["rate"],
            s["claims"],
            f(&s["pkb"]["submit_qps"]),
            f(&s["sustained_claims_per_s"]),
            three(&s["bound_s"]),
            three(&s["first_event_s"]),
            ms(f(&s["supervisor_bind_s"]["p50"])),
            ms(f(&s["supervisor_bind_s"]["p99"])),
            s["pkb"]["peak_concurrency"],
            s["failures"]
        );
    }
    println!("\nPerfKitBenchmarker agent-sandbox samples (startup_time = claim → bound, seconds):");
    for s in report["storms"].as_array().into_iter().flatten() {
        let fields: Vec<String> = s["pkb"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| match v.as_f64() {
                Some(x) if v.is_f64() => format!("{k}={x:.6}"),
                _ => format!("{k}={v}"),
            })
            .collect();
        println!("N={} K={}: {}", s["n"], s["rate"], fields.join(" "));
    }
    if let Some(e) = report.get("exec") {
        println!("\n| exec of /bin/true, sequential | p50 | p99 | overhead p50 over local |");
        println!("| --- | --- | --- | --- |");
        for (label, key) in [
            ("local spawn+wait", "local"),
            ("sandbox-supervisor relay", "relay"),
            ("docker exec", "docker"),
        ] {
            match e.get(key) {
                Some(v) if v.get("p50").is_some() => println!(
                    "| {label} (n={}) | {} ms | {} ms | {} |",
                    v["n"],
                    ms(f(&v["p50"])),
                    ms(f(&v["p99"])),
                    if key == "local" {
                        "—".into()
                    } else {
                        format!("{} ms", ms(f(&v["p50"]) - f(&e["local"]["p50"])))
                    }
                ),
                Some(v) => println!(
                    "| {label} | skipped: {} | | |",
                    v["skipped"].as_str().unwrap_or("")
                ),
                None => {}
            }
        }
    }
}
