#!/usr/bin/env bash
# Instructions keyrelay spends per request, by callgrind: count.sh BINARY json|stream [N]
# Starts the mock upstream (mock.py), runs BINARY under callgrind in a scratch directory for 200 and for 200 + N
# requests (drive.py), and prints the difference per request: start-up and shutdown cancel out. The two
# callgrind files are left in the scratch directory for diff.py (function-by-function comparison of two builds).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(realpath "$1")"; mode="$2"; n="${3:-2000}"
dir="$(mktemp -d)"; mkdir -p "$dir/providers"
printf 'base_url: http://127.0.0.1:18555/v1\n' > "$dir/providers/mock.yaml"
printf 'PROXY_API_KEY=test-proxy-key-0123456789\nMOCK_API_KEY_1=sk-proj-B6cDqW3xZ9mK2pL7vT4nRs8aQ1\n' > "$dir/.env"
printf 'port: 18556\n' > "$dir/config.yaml"
python3 "$here/mock.py" 18555 & mock=$!
trap 'kill $mock 2>/dev/null || true' EXIT
count() {
  local out="$dir/callgrind.$1.$mode"
  (cd "$dir" && exec valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" > "$dir/log.$1" 2>&1) & local vg=$!
  python3 "$here/drive.py" 18556 "$1" "$mode"
  kill -INT $vg; wait $vg || true
  callgrind_annotate "$out" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}
small=$(count 200); large=$(count $((200 + n)))
echo "$mode: $(( (large - small) / n )) instructions per request ($dir)"
