// Drives a running keyrelay with the official OpenAI Node SDK (run by tests/sdk.rs).
//
// Environment: KEYRELAY_URL (base URL with /v1), KEYRELAY_KEY (the proxy key). Exits non-zero on any failure.

import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.KEYRELAY_URL;
const client = new OpenAI({ baseURL, apiKey: process.env.KEYRELAY_KEY, maxRetries: 0 });

// Chat, with the raw response: every header keyrelay sends reads back as it was written (ASCII only).
const { data: reply, response } = await client.chat.completions
  .create({ model: "mock/gpt-sdk", messages: [{ role: "user", content: "hi" }] })
  .withResponse();
assert.equal(reply.choices[0].message.content, "Hello from the SDK test");
assert.match(response.headers.get("x-keyrelay-key"), /^\.\.\.[0-9a-z]{4}$/);

// Streaming, with usage
let text = "";
let usage = null;
const stream = await client.chat.completions.create({
  model: "mock/gpt-sdk",
  messages: [{ role: "user", content: "stream" }],
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(text, "Hello from the SDK test");
assert.ok(usage && usage.completion_tokens > 0, JSON.stringify(usage));

// Embeddings: the Node SDK asks for base64 by default and decodes it.
const embedded = await client.embeddings.create({ model: "mock/embed", input: ["a", "b"] });
assert.equal(embedded.data.length, 2);
assert.equal(embedded.data[0].embedding[0], 0.25);

// Models
const ids = [];
for await (const model of client.models.list()) ids.push(model.id);
assert.ok(ids.includes("mock/static-model"), ids.join(","));

// Errors raise the right classes
await assert.rejects(
  new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 }).chat.completions.create({
    model: "mock/gpt-sdk",
    messages: [{ role: "user", content: "hi" }],
  }),
  (e) => e instanceof OpenAI.AuthenticationError && e.status === 401,
);
await assert.rejects(
  client.chat.completions.create({ model: "limited/model", messages: [{ role: "user", content: "hi" }] }),
  (e) => e instanceof OpenAI.RateLimitError && Number(e.headers["retry-after"]) > 0,
);

console.log("openai node sdk: all checks passed");
