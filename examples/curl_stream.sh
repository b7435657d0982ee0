#!/bin/sh
# Stream a chat completion with curl (-N: print each server-sent event as it arrives).
#   OAS_BASE_URL=http://127.0.0.1:8000/v1 sh examples/curl_stream.sh
set -eu
BASE_URL="${OAS_BASE_URL:-http://127.0.0.1:8000/v1}"
MODEL="${OAS_MODEL:-qwen-audio-chat}"
API_KEY="${OAS_API_KEY:-not-needed}"

curl -sS -N --fail-with-body "$BASE_URL/chat/completions" \
  -H "Authorization: Bearer $API_KEY" \
  -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 32,
       \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"
