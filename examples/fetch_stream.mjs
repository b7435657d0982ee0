// Stream a chat completion with fetch (browsers, Node 18+) and parse the SSE events.
//   OAS_BASE_URL=http://127.0.0.1:8000/v1 node examples/fetch_stream.mjs
const baseUrl = process.env.OAS_BASE_URL ?? "http://127.0.0.1:8000/v1";
const apiKey = process.env.OAS_API_KEY ?? "not-needed";
// OAS_MODEL, else the first model the server lists (the name it was started with).
const model =
  process.env.OAS_MODEL ||
  (
    await (
      await fetch(`${baseUrl}/models`, { headers: { Authorization: `Bearer ${apiKey}` } })
    ).json()
  ).data[0].id;

const response = await fetch(`${baseUrl}/chat/completions`, {
  method: "POST",
  headers: { "Content-Type": "application/json", Authorization: `Bearer ${apiKey}` },
  body: JSON.stringify({
    model,
    stream: true,
    max_tokens: 32,
    messages: [{ role: "user", content: "Say hello." }],
  }),
});
if (!response.ok) {
  console.error(response.status, await response.text());
  process.exit(1);
}

const decoder = new TextDecoder();
let buffer = "";
let done = false;
for await (const bytes of response.body) {
  buffer += decoder.decode(bytes, { stream: true });
  let end;
  // Events are separated by a blank line; each data line carries one JSON chunk.
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const event = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    for (const line of event.split("\n")) {
      if (!line.startsWith("data: ")) continue; // comments such as keep-alives
      const data = line.slice(6);
      if (data === "[DONE]") {
        done = true;
        continue;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const text = chunk.choices[0]?.delta?.content;
      if (text) process.stdout.write(text);
    }
  }
}
process.stdout.write(done ? "\n[done]\n" : "\n[stream ended without [DONE]]\n");
if (!done) process.exit(1);
