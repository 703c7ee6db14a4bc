"""Fallback chart with gnuplot (used when matplotlib cannot be installed): one bar per metric, the
ratio peersync/anchor on a log scale (1 = parity).

    python3 chart_gnuplot.py bench.json bench.png
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = [r for r in data["rows"] if r["ratio"]]
    with tempfile.TemporaryDirectory() as d:
        dat = Path(d) / "ratios.dat"
        dat.write_text("".join(f'"{r["workload"]} {r["metric"]} ({r["better"]} better)" {r["ratio"]}\n' for r in rows))
        script = f"""
set terminal pngcairo size 1200,{200 + 40 * len(rows)} font ",9"
set output "{dst}"
set title "peersync / anchor, medians ({data['mode']} run, {data['runs']} run(s) each); 1 = parity"
set style fill solid 0.8
set logscale x
set xlabel "ratio peersync/anchor"
set ytics nomirror
set yrange [-0.5:{len(rows) - 0.5}]
set grid x
plot "{dat}" using 2:0:(1):2:($0-0.35):($0+0.35):yticlabels(1) with boxxyerror notitle
"""
        subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
