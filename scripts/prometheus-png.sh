#!/usr/bin/env bash
# Makes docs/prometheus.png, the README's picture of a few of a cluster's series as a real Prometheus
# scraped them: starts a 3-node cluster (scripts/cluster.sh) and Prometheus scraping it every second,
# runs a 38 s write workload (steady writes through all three nodes, a burst of batches, node3
# stopped while the others take batches, node3 started again and catching up), then reads four
# queries back with /api/v1/query_range, draws them as SVG (python3's standard library) and
# screenshots that with headless chromium.
#
#   scripts/prometheus-png.sh [--out FILE]     default docs/prometheus.png
#
# Installs prometheus, chromium and fonts-dejavu-core with apt-get when missing. PEERSYNC_BIN: the
# binary to run (default: `cargo build --release`, target/release/peersync). Ports: nodes' APIs
# 7871-7873 (p2p 7971-7973), Prometheus 19091 (scripts/prometheus.sh uses 7861-7863 and 19090).
# Logs, events.json and the chart's HTML stay in target/prometheus-png. At exit, on failure too,
# Prometheus and the nodes are stopped and their data (nodes' databases, the TSDB) removed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/docs/prometheus.png
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$(realpath -m "$2"); shift ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[prometheus-png.sh] %s\n' "$*" >&2; }

# shellcheck source=lib/apt.sh
. "$root/scripts/lib/apt.sh"
# Debian's package also starts a system service on 9090 where systemd runs; this script runs its own.
command -v prometheus >/dev/null || apt_install prometheus
chromium=$(find_chromium)

if [ -n "${PEERSYNC_BIN:-}" ] && [ -x "$PEERSYNC_BIN" ]; then
    say "using $PEERSYNC_BIN"
else
    (cd "$root" && cargo build --release --bin peersync) >&2
    PEERSYNC_BIN=$root/target/release/peersync
fi

dir=$root/target/prometheus-png
base=7870
prom_port=19091
export PEERSYNC_BIN PEERSYNC_CLUSTER_DIR=$dir/cluster PEERSYNC_BASE_PORT=$base
unset PEERSYNC_ROLES
rm -rf "$dir"
mkdir -p "$dir"
prom_pid=""
load_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$load_pid" ]; then
        kill -TERM "$load_pid" 2>/dev/null || true
        wait "$load_pid" 2>/dev/null || true
    fi
    if [ -n "$prom_pid" ]; then
        kill -TERM "$prom_pid" 2>/dev/null || true
        wait "$prom_pid" 2>/dev/null || true
    fi
    "$root/scripts/cluster.sh" stop >/dev/null 2>&1 || true
    # The nodes' databases and Prometheus's TSDB (a few hundred MB); logs and chart.html stay.
    rm -rf "$dir"/cluster/node*/ "$dir/tsdb"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$root/scripts/cluster.sh" start 3 >&2

cat >"$dir/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: peersync
    static_configs:
      - targets: ['127.0.0.1:$((base + 1))']
        labels: {node: node1}
      - targets: ['127.0.0.1:$((base + 2))']
        labels: {node: node2}
      - targets: ['127.0.0.1:$((base + 3))']
        labels: {node: node3}
YML
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$dir/prometheus.log" 2>&1 &
prom_pid=$!
prom=http://127.0.0.1:$prom_port
say "Prometheus at $prom (log: $dir/prometheus.log)"
# Ready, and scraping all three nodes.
for attempt in $(seq 300); do
    if ! kill -0 "$prom_pid" 2>/dev/null; then
        say "Prometheus exited; its log:"
        cat "$dir/prometheus.log" >&2
        exit 1
    fi
    up=$(curl -fsS --get "$prom/api/v1/query" --data-urlencode 'query=sum(up{job="peersync"})' 2>/dev/null |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else 0)' \
        2>/dev/null || echo 0)
    [ "$up" = 3 ] && break
    if [ "$attempt" = 300 ]; then
        say "Prometheus does not see the three nodes up within 30 s; its log:"
        tail -20 "$dir/prometheus.log" >&2
        exit 1
    fi
    sleep 0.1
done
say "Prometheus scrapes all three nodes; 3 s of quiet, then the workload"
sleep 3

# --- the workload: writes timed from its start; events (unix times) go to events.json. It runs in
# the background so that a TERM to this script stops it at once (the trap kills it).
python3 - "$root/scripts/cluster.sh" "$dir/events.json" "$base" <<'EOF' &
import json, random, subprocess, sys, time, urllib.request

cluster_sh, events_path, base = sys.argv[1], sys.argv[2], int(sys.argv[3])
api = {n: f"http://127.0.0.1:{base + n}" for n in (1, 2, 3)}
rng = random.Random(14)
t0 = time.time()
events = {"start": t0}
written = {1: 0, 2: 0, 3: 0}


def say(msg):
    print(f"[prometheus-png.sh] t={time.time() - t0:5.1f}s {msg}", file=sys.stderr, flush=True)


def put(n):
    key = f"k{rng.randrange(5000)}"
    req = urllib.request.Request(f"{api[n]}/v1/registers/load/{key}", data=b"v%d" % rng.randrange(10**6), method="PUT")
    urllib.request.urlopen(req, timeout=10).read()
    written[n] += 1


batch_no = 0


def batch(n):
    global batch_no
    batch_no += 1
    entries = [{"key": f"b{batch_no}-{i}", "value": "x" * 100} for i in range(500)]
    req = urllib.request.Request(f"{api[n]}/v1/registers/burst", data=json.dumps({"entries": entries}).encode(), method="POST")
    urllib.request.urlopen(req, timeout=30).read()
    written[n] += 500


def phase(until, nodes, puts_per_s, batch_nodes=()):
    """Until `until` s after t0: puts_per_s single PUTs a second through each of nodes, and batches of
    500 as fast as they go through batch_nodes (round robin)."""
    start, done, i = time.time(), 0, 0
    while (now := time.time()) - t0 < until:
        due = int((now - start) * puts_per_s)
        while done < due:
            for n in nodes:
                put(n)
            done += 1
        if batch_nodes:
            batch(batch_nodes[i % len(batch_nodes)])
            i += 1
        else:
            time.sleep(0.01)


def cluster(*args):
    subprocess.run([cluster_sh, *args], check=True, stdout=sys.stderr)


say("steady: 20 writes/s through each node")
phase(8, (1, 2, 3), 20)
events["burst_start"] = time.time()
say("burst: batches of 500 through all three nodes")
phase(12, (1, 2, 3), 20, (1, 2, 3))
events["burst_end"] = time.time()
say("steady")
phase(16, (1, 2, 3), 20)
say("stopping node3")
events["node3_stopped"] = time.time()
cluster("stop-node", "3")
say("node3 down: batches through node1 and node2 until t=24 s, then steady writes")
phase(24, (1, 2), 20, (1, 2))
phase(26, (1, 2), 20)
say("starting node3")
cluster("start-node", "3")
events["node3_started"] = time.time()
phase(38, (1, 2, 3), 20)
events["end"] = time.time()
say(f"done; ops written through node1, node2, node3: {written[1]}, {written[2]}, {written[3]}")
json.dump(events, open(events_path, "w"))
EOF
load_pid=$!
wait "$load_pid" || { rc=$?; load_pid=""; say "the workload failed (exit $rc)"; exit 1; }
load_pid=""
sleep 3 # the last scrapes

# --- query_range -> SVG in HTML
python3 - "$prom" "$dir/events.json" "$dir/chart.html" <<'EOF'
import html, json, math, sys, urllib.parse, urllib.request

prom, events_path, out_path = sys.argv[1:4]
ev = json.load(open(events_path))
t0, t_end = ev["start"], ev["end"] + 2
q_start, step = t0 - 3, 1.0


def query_range(q):
    url = f"{prom}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": q, "start": f"{q_start:.3f}", "end": f"{t_end:.3f}", "step": str(step)})
    body = json.load(urllib.request.urlopen(url, timeout=30))
    if body.get("status") != "success":
        sys.exit(f"query {q}: {body}")
    return body["data"]["result"]


node_colors = {"node1": "#1f77b4", "node2": "#e8741c", "node3": "#2ca02c"}
proto_colors = ["#7b3fb5", "#d62728", "#17becf", "#8c564b", "#bcbd22", "#e377c2"]
panels = [
    dict(title="Ops applied per second, by node",
         query="sum by (node) (rate(peersync_ops_local_total[3s]) + rate(peersync_ops_remote_total[3s]))",
         label="node", log=True, unit="ops/s"),
    dict(title="Bytes received per second, by protocol (all nodes)",
         query="sum by (protocol) (rate(peersync_bytes_received_total[3s]))",
         label="protocol", log=True, unit="B/s"),
    dict(title="Lag: ops a peer holds beyond this node (max)",
         query="max by (node) (peersync_lag_ops)",
         label="node", log=False, unit="ops"),
    dict(title="Connected peers, by node",
         query="peersync_connected_peers",
         label="node", log=False, unit="peers"),
]
for p in panels:
    result = query_range(p["query"])
    if not result:
        sys.exit(f"query {p['query']}: no series in the range")
    p["series"] = sorted(
        ((r["metric"].get(p["label"], "?"), [(float(t) - t0, float(v)) for t, v in r["values"]]) for r in result),
        key=lambda s: s[0])
    print(f"[prometheus-png.sh] {p['query']}: " + ", ".join(
        f"{name} max {max(v for _, v in pts):.0f}" for name, pts in p["series"]), file=sys.stderr)
lag_max = max(v for _, pts in panels[2]["series"] for _, v in pts)
if lag_max == 0:
    print("[prometheus-png.sh] warning: no lag was scraped (node3 caught up between two scrapes)", file=sys.stderr)

W, H = 1400, 900
cols, rows = 2, 2
top, pad = 78, 14
pw, ph = (W - pad * (cols + 1)) / cols, (H - top - pad * (rows + 1)) / rows
x_lo, x_hi = q_start - t0, t_end - t0
svg = []
esc = html.escape


def fmt(v):
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            x = v / div
            return f"{x:.0f}{suffix}" if x == int(x) else f"{x:.1f}{suffix}"
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def draw(p, px, py):
    svg.append(f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>')
    svg.append(f'<text x="{px + 12}" y="{py + 22}" class="title">{esc(p["title"])}</text>')
    svg.append(f'<text x="{px + 12}" y="{py + 40}" class="query">{esc(p["query"])}</text>')
    # legend, right-aligned on the title row
    lx = px + pw - 12
    for name, _ in reversed(p["series"]):
        w = 7.5 * len(name) + 26
        lx -= w
        svg.append(f'<line x1="{lx}" y1="{py + 17}" x2="{lx + 16}" y2="{py + 17}" stroke="{p["colors"][name]}" stroke-width="3"/>')
        svg.append(f'<text x="{lx + 20}" y="{py + 22}" class="legend">{esc(name)}</text>')
    ax, ay, aw, ah = px + 72, py + 56, pw - 72 - 18, ph - 56 - 44
    vmax = max([v for _, pts in p["series"] for _, v in pts] + [0])
    if p["log"]:
        lo = 1.0
        hi = 10 ** max(1, math.ceil(math.log10(max(vmax, 10))))
        ticks = [10 ** k for k in range(0, int(round(math.log10(hi))) + 1)]
        ymap = lambda v: ay + ah - (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ah
    else:
        raw = max(vmax, 1) * 1.1
        mag = 10 ** math.floor(math.log10(raw))
        stepv = next(s * mag for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10) if raw / (s * mag) <= 5)
        stepv = max(stepv, 1)
        hi = math.ceil(raw / stepv) * stepv
        ticks = [i * stepv for i in range(int(round(hi / stepv)) + 1)]
        ymap = lambda v: ay + ah - v / hi * ah
    xmap = lambda t: ax + (t - x_lo) / (x_hi - x_lo) * aw
    # shaded spans and event lines
    spans = [("burst", ev["burst_start"], ev["burst_end"], "#fff3bf"),
             ("node3 stopped", ev["node3_stopped"], ev["node3_started"], "#ffe3e3")]
    for name, a, b, color in spans:
        xa, xb = xmap(a - t0), xmap(b - t0)
        svg.append(f'<rect x="{xa}" y="{ay}" width="{xb - xa}" height="{ah}" fill="{color}"/>')
        svg.append(f'<text x="{(xa + xb) / 2}" y="{ay + 14}" class="span">{name}</text>')
    # grid and axes
    for v in ticks:
        y = ymap(v)
        svg.append(f'<line x1="{ax}" y1="{y}" x2="{ax + aw}" y2="{y}" stroke="#e6e6e6"/>')
        svg.append(f'<text x="{ax - 6}" y="{y + 4}" class="tick" text-anchor="end">{fmt(v)}</text>')
    t = math.ceil(x_lo / 5) * 5
    while t <= x_hi:
        x = xmap(t)
        svg.append(f'<line x1="{x}" y1="{ay + ah}" x2="{x}" y2="{ay + ah + 5}" stroke="#555"/>')
        svg.append(f'<text x="{x}" y="{ay + ah + 18}" class="tick" text-anchor="middle">{t:.0f}</text>')
        t += 5
    svg.append(f'<line x1="{ax}" y1="{ay}" x2="{ax}" y2="{ay + ah}" stroke="#555"/>')
    svg.append(f'<line x1="{ax}" y1="{ay + ah}" x2="{ax + aw}" y2="{ay + ah}" stroke="#555"/>')
    svg.append(f'<text x="{ax + aw / 2}" y="{ay + ah + 36}" class="axis" text-anchor="middle">'
               f'seconds since the workload started</text>')
    ylabel = p["unit"] + (" (log scale, 0 drawn as 1)" if p["log"] else "")
    cy = ay + ah / 2
    svg.append(f'<text x="{px + 18}" y="{cy}" class="axis" text-anchor="middle" transform="rotate(-90 {px + 18} {cy})">'
               f'{esc(ylabel)}</text>')
    # series; a missing sample (no scrape: node3 down) breaks the line
    # thicker lines first, so that lines lying on one another all stay visible
    for k, (name, pts) in enumerate(p["series"]):
        width = max(1.8, 4.5 - 1.4 * k)
        d, prev = [], None
        for t, v in pts:
            cmd = "L" if prev is not None and t - prev <= step * 1.5 else "M"
            d.append(f"{cmd}{xmap(t):.1f},{ymap(v):.1f}")
            prev = t
        svg.append(f'<path d="{" ".join(d)}" fill="none" stroke="{p["colors"][name]}" stroke-width="{width}" '
                   f'stroke-linejoin="round"/>')


for i, p in enumerate(panels):
    if p["label"] == "node":
        p["colors"] = node_colors
    else:
        p["colors"] = {name: proto_colors[k % len(proto_colors)] for k, (name, _) in enumerate(p["series"])}
    px = pad + (i % cols) * (pw + pad)
    py = top + pad + (i // cols) * (ph + pad)
    draw(p, px, py)

title = "peersync: a 3-node cluster as Prometheus scraped it (every 1 s), read back with /api/v1/query_range"
sub = ("Workload: 20 writes/s through each node; a burst of 500-entry batches through all three; node3 stopped "
       "while node1 and node2 take batches, then started again. Made by scripts/prometheus-png.sh.")
page = f"""<!doctype html><meta charset="utf-8"><style>
body {{ margin: 0; background: #f5f5f5; }}
text {{ font-family: "DejaVu Sans", sans-serif; fill: #222; }}
.h1 {{ font-size: 21px; font-weight: bold; }}
.sub {{ font-size: 13.5px; fill: #555; }}
.title {{ font-size: 15px; font-weight: bold; }}
.query {{ font-family: "DejaVu Sans Mono", monospace; font-size: 11.5px; fill: #666; }}
.legend {{ font-size: 13px; }}
.tick {{ font-size: 12px; fill: #444; }}
.axis {{ font-size: 12.5px; fill: #444; }}
.span {{ font-size: 11.5px; fill: #8a6d00; text-anchor: middle; }}
</style><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">
<text x="{pad}" y="32" class="h1">{esc(title)}</text>
<text x="{pad}" y="56" class="sub">{esc(sub)}</text>
{chr(10).join(svg)}
</svg>"""
open(out_path, "w", encoding="utf-8").write(page)
EOF

mkdir -p "$(dirname "$out")"
if ! "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --screenshot="$out" --window-size=1400,900 "file://$dir/chart.html" >"$dir/chromium.log" 2>&1 || [ ! -s "$out" ]; then
    say "chromium could not make the screenshot; its output:"
    cat "$dir/chromium.log" >&2
    exit 1
fi
say "wrote $out"
