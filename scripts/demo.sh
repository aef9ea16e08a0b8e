#!/usr/bin/env bash
# Fresh machine -> train the bundled `demo` model, serve it, and ask it something through the OpenAI API.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

rwkv-train --config-dir config --train-cfg demo

rwkv-infer --config-dir config --infer-cfg demo &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf http://127.0.0.1:8080/health >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "rwkv-infer exited early" >&2; exit 1; }
  sleep 1
done
python - <<'PY'
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
reply = client.chat.completions.create(
    model="demo", messages=[{"role": "user", "content": "Tell me a story about the sea."}],
    max_tokens=120, temperature=0.8, top_p=0.9, seed=7)
print("\n--- the demo model answers ---\n" + reply.choices[0].message.content)
print(f"--- usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens ---")
PY
