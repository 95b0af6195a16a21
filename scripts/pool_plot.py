#!/usr/bin/env python3
"""Plot the pool bench (benches/pool.rs): claim latency against claim rate, one line per
pool size N. Left: activation -> bound; right: activation -> exit of /bin/true.
Solid lines are p50, dashed p99.

    pip install matplotlib
    python3 scripts/pool_plot.py bench-out/pool.json pool-latency.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "bench-out/pool.json"
    out = sys.argv[2] if len(sys.argv) > 2 else "pool-latency.png"
    with open(src) as f:
        report = json.load(f)
    by_n = {}
    for s in report["storms"]:
        by_n.setdefault(s["n"], []).append(s)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = [("bound_s", "activation \u2192 bound"), ("first_event_s", "activation \u2192 exit of /bin/true")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, panels):
        for i, (n, storms) in enumerate(sorted(by_n.items())):
            storms.sort(key=lambda s: s["rate"])
            rates = [s["rate"] for s in storms]
            c = colors[i % len(colors)]
            ax.plot(rates, [s[key]["p50"] * 1e3 for s in storms], "o-", color=c, label=f"N={n} p50")
            ax.plot(rates, [s[key]["p99"] * 1e3 for s in storms], "s--", color=c, label=f"N={n} p99")
        ax.set_title(title)
        ax.set_xlabel("claim rate K (claims/s, open loop)")
        ax.set_xscale("log")
        ax.set_xticks(sorted({s["rate"] for s in report["storms"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, log scale)")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(
        f"Pool scale: N parked supervisors at one gateway ({report['cpu']}, {report['cores']} cores, "
        f"heartbeat {report['heartbeat_ms']} ms)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
