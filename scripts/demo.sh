#!/usr/bin/env bash
# The README's quick start: tiny model -> mi-convert -> mi-backend -> mi-frontend -> a streamed
# completion printed as it arrives -> both servers stopped cleanly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh

OUT=${MI_DEMO_DIR:-demo-out}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
BACKEND_PORT=${MI_BACKEND_PORT:-$(free_port)}
FRONTEND_PORT=${MI_FRONTEND_PORT:-$(free_port)}
BACKEND_PID=""; FRONTEND_PID=""
stop() {
  for pid in $FRONTEND_PID $BACKEND_PID; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $FRONTEND_PID $BACKEND_PID; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT

echo "== building the tiny Llama model in $OUT/tiny-llama"
python -m mi.models.tiny --arch llama --out "$OUT/tiny-llama"
echo "== mi-convert --path $OUT/tiny-llama --out $OUT/tiny-llama-tp1 --tp 1"
mi-convert --path "$OUT/tiny-llama" --out "$OUT/tiny-llama-tp1" --tp 1 --force
echo "== mi-backend --model $OUT/tiny-llama-tp1 --device all --port $BACKEND_PORT"
mi-backend --model "$OUT/tiny-llama-tp1" --device all --port "$BACKEND_PORT" > "$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 600); do
  grep -q "service start at" "$OUT/backend.log" && break
  kill -0 "$BACKEND_PID" 2>/dev/null || { cat "$OUT/backend.log"; exit 1; }
  sleep 0.2
done
grep "service start at" "$OUT/backend.log"
echo "== mi-frontend --backend $BACKEND_PORT --server-port $FRONTEND_PORT"
mi-frontend --backend "$BACKEND_PORT" --server-port "$FRONTEND_PORT" > "$OUT/frontend.log" 2>&1 &
FRONTEND_PID=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$FRONTEND_PORT/health" >/dev/null && break
  kill -0 "$FRONTEND_PID" 2>/dev/null || { cat "$OUT/frontend.log"; exit 1; }
  sleep 0.2
done
echo "== curl -N http://localhost:$FRONTEND_PORT/v1/completions (stream)"
curl -sN "http://127.0.0.1:$FRONTEND_PORT/v1/completions" -H "Content-Type: application/json" \
  -d '{"prompt": "Say this is a test", "max_tokens": 32, "temperature": 0, "stream": true}'
echo "== stopping"
stop
trap - EXIT
echo "== done (logs in $OUT/*.log)"
