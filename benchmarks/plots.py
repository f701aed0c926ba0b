"""PNG plots of benchmark results (matplotlib, Agg backend): time and peak memory vs N and vs V.

    python -m benchmarks.plots benchmarks/results/cpu-2026-11-27/loss.json   # re-plot a saved run

For every group of cases that differ only in N (same op, H, V, dtype) or only in V (same op, N, H,
dtype) with at least two sizes, one figure with two panels: median time (process CPU time for CPU
runs, see ``harness.rate_ms``) and peak extra memory per implementation, log-log axes. OOM / failed / skipped rows are left out of the lines and listed in
the figure's footnote.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.harness import rate_ms


def _groups(rows: list[dict], sweep: str) -> dict[tuple, list[dict]]:
    fixed = {"n": ("op", "h", "v", "dtype"), "v": ("op", "n", "h", "dtype")}[sweep]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r["case"][k] for k in fixed)].append(r)
    return {k: g for k, g in groups.items() if len({r["case"][sweep] for r in g}) >= 2}


def plot_loss_rows(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Write ``<op>_vs_<n|v>_*.png`` into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    for sweep in ("n", "v"):
        for key, group in _groups(rows, sweep).items():
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            failed = []
            by_impl: dict[str, list[dict]] = defaultdict(list)
            for r in group:
                if r.get("status") == "ok":
                    by_impl[r["impl_label"]].append(r)
                else:
                    failed.append(f"{r['impl']} @ {sweep.upper()}={r['case'][sweep]}: {r.get('status')}")
            for label, rs in sorted(by_impl.items()):
                rs.sort(key=lambda r: r["case"][sweep])
                xs = [r["case"][sweep] for r in rs]
                ax_t.plot(xs, [rate_ms(r) for r in rs], marker="o", label=label)
                ax_m.plot(xs, [max(r["extra_bytes"], 1) / 2**20 for r in rs], marker="o", label=label)
            fixed = dict(zip(("op", "h", "v", "dtype") if sweep == "n" else ("op", "n", "h", "dtype"), key))
            title = ", ".join(f"{k}={v}" for k, v in fixed.items())
            cpu = any("cpu_median_ms" in r for r in group)
            time_label = "fwd+bwd median CPU time (ms)" if cpu else "fwd+bwd median time (ms)"
            for ax, ylabel in ((ax_t, time_label), (ax_m, "peak extra memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (loss tokens)" if sweep == "n" else "V (vocabulary)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=7)
            device = group[0].get("device", "")
            fig.suptitle(f"{title}  |  {device}", fontsize=9)
            if failed:
                fig.text(0.01, 0.01, "not plotted: " + "; ".join(failed)[:300], fontsize=6)
            fig.tight_layout(rect=(0, 0.04, 1, 0.95))
            name = f"{fixed['op']}_vs_{sweep}_" + "_".join(f"{k}{v}" for k, v in fixed.items() if k != "op") + ".png"
            path = out_dir / name
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a saved loss.json")
    parser.add_argument("json", help="loss.json written by python -m benchmarks.loss")
    parser.add_argument("--out", help="folder for the PNGs (default: next to the JSON)")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.json).read_text())["rows"]
    for p in plot_loss_rows(rows, args.out or Path(args.json).parent):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
