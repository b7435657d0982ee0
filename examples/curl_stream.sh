#!/bin/sh
# Stream a chat completion with curl (-N: print each server-sent event as it arrives).
#   OAS_BASE_URL=http://127.0.0.1:8000/v1 sh examples/curl_stream.sh
set -eu
BASE_URL="${OAS_BASE_URL:-http://127.0.0.1:8000/v1}"
API_KEY="${OAS_API_KEY:-not-needed}"
# OAS_MODEL, else the first model the server lists (the name it was started with).
MODEL="${OAS_MODEL:-$(curl -sS --fail-with-body -H "Authorization: Bearer $API_KEY" \
  "$BASE_URL/models" | grep -o '"id":"[^"]*"' | head -n 1 | cut -d '"' -f 4)}"

curl -sS -N --fail-with-body "$BASE_URL/chat/completions" \
  -H "Authorization: Bearer $API_KEY" \
  -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 32,
       \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"
