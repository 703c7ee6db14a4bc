#!/usr/bin/env bash
# Makes docs/watch.png, the README's picture of `peersync status --watch`: starts a primary A with
# about 8 MB of values and snapshots it, starts a primary B and a replica C that pull that snapshot one
# 4 KiB chunk at a time, runs B's live view in a 120x30 tmux pane, captures the pane with its colors
# (`tmux capture-pane -e -p`) once the pull shows a rate, turns the ANSI text into HTML and screenshots
# it with headless chromium.
#
#   scripts/watch-png.sh [--out FILE]        default docs/watch.png
#
# Installs tmux and chromium with apt-get when missing. PEERSYNC_BIN: the binary to run (default: a
# debug build, `cargo build --locked --bin peersync`, in $CARGO_TARGET_DIR or target/). Nodes, data and
# the tmux server live in a temp dir; all are stopped and removed at exit.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/docs/watch.png
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$(realpath -m "$2"); shift ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[watch-png.sh] %s\n' "$*" >&2; }

# shellcheck source=lib/apt.sh
. "$root/scripts/lib/apt.sh"
command -v tmux >/dev/null || apt_install tmux
chromium=$(find_chromium)

bin=${PEERSYNC_BIN:-}
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --locked --bin peersync >&2)
    bin=${CARGO_TARGET_DIR:-$root/target}/debug/peersync
fi

tmp=$(mktemp -d)
socket=peersync-watch-png-$$
pids=()
cleanup() {
    tmux -L "$socket" kill-server 2>/dev/null || true
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# --- nodes: fast digests, 4 KiB chunks, a log compacted away so a new node must pull the snapshot
fast=(--gossip-heartbeat-ms 100 --discovery-interval-ms 300 --digest-min-ms 100)
small=(--snapshot-chunk-bytes 4096 --log-retention-ops 10 --log-retention-bytes 1)
api_of=()
start_node() { # NAME FLAGS...: starts a node, sets $api to its API URL
    local name=$1
    shift
    "$bin" node --data-dir "$tmp/$name" --api 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0 --no-mdns "$@" \
        >"$tmp/$name.out" 2>"$tmp/$name.log" &
    pids+=($!)
    for _ in $(seq 300); do
        api=$(sed -n 's/^api: //p' "$tmp/$name.out")
        [ -n "$api" ] && return 0
        sleep 0.1
    done
    say "$name did not print its API address within 30 s; its log:"
    cat "$tmp/$name.log" >&2
    exit 1
}
start_node a "${fast[@]}" "${small[@]}"
a_api=$api
a_id=$(sed -n 's/^peer_id: //p' "$tmp/a.out")
say "A at $a_api: writing 16 batches of 500 values of 1000 bytes"
python3 - "$a_api" <<'EOF'
import json, random, sys, urllib.request
rng = random.Random(7)
for batch in range(16):
    entries = [{"key": f"k{batch}-{i}", "value": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=1000))}
               for i in range(500)]
    req = urllib.request.Request(f"{sys.argv[1]}/v1/registers/data", data=json.dumps({"entries": entries}).encode(),
                                 method="POST")
    urllib.request.urlopen(req).read()
EOF
curl -fsS -X POST "$a_api/v1/snapshots" >"$tmp/snapshot.json"
say "snapshot: $(cat "$tmp/snapshot.json")"
listen=$(curl -fsS "$a_api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')
boot=$listen/p2p/$a_id

start_node b "${fast[@]}" --bootstrap "$boot" --snapshot-chunks-per-source 1
b_api=$api
start_node c "${fast[@]}" --bootstrap "$boot" --role replica --snapshot-chunks-per-source 1

# --- the view, captured once the pull shows a rate and is a quarter through
printf 'set -g remain-on-exit on\n' >"$tmp/tmux.conf"
LANG=C.UTF-8 tmux -L "$socket" -f "$tmp/tmux.conf" new-session -d -s w -x 120 -y 30 \
    env -u COLUMNS -u LINES TERM=xterm-256color "$bin" status --watch --interval-ms 500 --api "$b_api"
captured=""
for _ in $(seq 600); do
    screen=$(tmux -L "$socket" capture-pane -p -t w)
    if grep -Eq '^ +\[#+\.*\] +([2-9][0-9]|1[0-9][0-9])\.[0-9]%.*/s  ETA [0-9]' <<<"$screen"; then
        tmux -L "$socket" capture-pane -e -p -t w >"$tmp/pane.ans"
        captured=yes
        break
    fi
    if grep -q 'state active' <<<"$screen"; then
        say "the pull ended before the view showed it under way; the screen:"
        printf '%s\n' "$screen" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$captured" ]; then
    say "no progress bar with a rate within 60 s; the screen:"
    tmux -L "$socket" capture-pane -p -t w >&2
    exit 1
fi
cat "$tmp/pane.ans" >&2

# --- ANSI text -> HTML -> PNG
size=$(python3 - "$tmp/pane.ans" "$tmp/pane.html" <<'EOF'
import html, re, sys
text = open(sys.argv[1], encoding="utf-8").read().rstrip("\n ").split("\n")
while text and not text[-1].strip():
    text.pop()
colors = {30: "#555", 31: "#ff6b6b", 32: "#69db7c", 33: "#ffd43b", 34: "#74c0fc", 35: "#e599f7", 36: "#66d9e8", 37: "#eee"}
out, style = [], {}
def span(s):
    if not s:
        return ""
    css = ";".join(f"{k}:{v}" for k, v in style.items())
    return f'<span style="{css}">{html.escape(s)}</span>' if css else html.escape(s)
for line in text:
    parts = re.split(r"\x1b\[([0-9;]*)m", line)
    row = span(parts[0])
    for i in range(1, len(parts), 2):
        for code in [int(c) if c else 0 for c in parts[i].split(";")]:
            if code == 0:
                style = {}
            elif code == 1:
                style["font-weight"] = "bold"
            elif code == 2:
                style["opacity"] = "0.5"
            elif code == 22:
                style.pop("font-weight", None); style.pop("opacity", None)
            elif code in colors:
                style["color"] = colors[code]
            elif code == 39:
                style.pop("color", None)
        row += span(parts[i + 1])
    out.append(row)
cols = 120
page = f"""<!doctype html><meta charset="utf-8"><style>
body {{ margin: 0; background: #1e1e1e; }}
pre {{ margin: 0; padding: 12px 16px; color: #ddd; font: 14px/18px "DejaVu Sans Mono", monospace; }}
</style><pre>{chr(10).join(out)}</pre>"""
open(sys.argv[2], "w", encoding="utf-8").write(page)
print(f"{cols * 9 + 32},{len(out) * 18 + 24}")
EOF
)
mkdir -p "$(dirname "$out")"
if ! "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --screenshot="$out" --window-size="$size" "file://$tmp/pane.html" >"$tmp/chromium.log" 2>&1 || [ ! -s "$out" ]; then
    say "chromium could not make the screenshot; its output:"
    cat "$tmp/chromium.log" >&2
    exit 1
fi
say "wrote $out ($size)"
