"""Draws bench-results/bench.json as a PNG: one panel per metric, peersync next to its anchor, with the
median as the bar and every run as a dot. Needs matplotlib (scripts/bench.sh installs it in a venv).

    python chart.py bench.json bench.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = [r for r in data["rows"] if r["peersync"]["median"] is not None]
    if not rows:
        print(f"chart.py: no measured rows in {src} (every workload failed or was skipped); no chart drawn",
              file=sys.stderr)
        return
    cols = 3
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        names = ["peersync"]
        meds = [r["peersync"]["median"]]
        runs = [r["peersync"]["runs"]]
        if r["anchor"]["median"] is not None:
            names.append(r["anchor"]["name"].replace(", ", "\n"))
            meds.append(r["anchor"]["median"])
            runs.append(r["anchor"]["runs"])
        colors = ["#2b6cb0", "#c05621"][: len(names)]
        bars = ax.bar(range(len(names)), meds, color=colors, width=0.6)
        for i, rs in enumerate(runs):
            ax.scatter([i] * len(rs), rs, color="black", s=12, zorder=3)
        for b, m in zip(bars, meds):
            ax.annotate(f"{m:,.3g}" if m < 1000 else f"{m:,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        title = f"{r['workload']}: {r['metric']}"
        if r["ratio"] is not None:
            title += f"\npeersync/anchor = {r['ratio']:.3g} ({r['better']} is better)"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(r["unit"])
        ax.margins(y=0.15)
    fig.suptitle(f"peersync vs anchors — {data['mode']} run, medians of {data['runs']} run(s), "
                 f"{data['versions'].get('cpus')} cores, loopback", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
