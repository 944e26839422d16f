"""Drives a running keyrelay with the official OpenAI Python SDK (run by tests/sdk.rs).

Environment: KEYRELAY_URL (base URL with /v1), KEYRELAY_KEY (the proxy key). Exits non-zero on any failure.
"""

import os

import openai
from openai import OpenAI

base_url = os.environ["KEYRELAY_URL"]
key = os.environ["KEYRELAY_KEY"]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0)

# Chat
reply = client.chat.completions.create(model="mock/gpt-sdk", messages=[{"role": "user", "content": "hi"}])
assert reply.choices[0].message.content == "Hello from the SDK test", reply
assert reply.usage.total_tokens == 18, reply.usage

# Streaming, with usage
text = ""
usage = None
for chunk in client.chat.completions.create(
    model="mock/gpt-sdk",
    messages=[{"role": "user", "content": "stream"}],
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert text == "Hello from the SDK test", text
assert usage is not None and usage.completion_tokens > 0, usage

# Legacy completions, plain and streamed (translated to chat for this provider)
done = client.completions.create(model="mock/gpt-sdk", prompt="Say hello", max_tokens=20)
assert done.object == "text_completion" and done.choices[0].text == "Hello from the SDK test", done
assert done.usage.total_tokens == 18, done.usage
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model="mock/gpt-sdk", prompt="Say hello", max_tokens=20, stream=True)
    if c.choices
)
assert streamed == "Hello from the SDK test", streamed
try:
    client.completions.create(model="mock/gpt-sdk", prompt="x", echo=True)
    raise SystemExit("echo was accepted through a chat translation")
except openai.BadRequestError as e:
    assert e.param == "echo", e.body

# Embeddings, string and list
one = client.embeddings.create(model="mock/embed", input="a")
assert len(one.data) == 1 and one.data[0].embedding[0] == 0.25, one
many = client.embeddings.create(model="mock/embed", input=["a", "b", "c"])
assert [d.index for d in many.data] == [0, 1, 2], many

# Models
ids = [m.id for m in client.models.list()]
assert "mock/static-model" in ids and "mock/mock-model" in ids, ids
assert client.models.retrieve("mock/static-model").id == "mock/static-model"

# Errors raise the right exception types
try:
    OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).chat.completions.create(
        model="mock/gpt-sdk", messages=[{"role": "user", "content": "hi"}]
    )
    raise SystemExit("a wrong proxy key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

try:
    client.chat.completions.create(model="nobody/model", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown provider was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "unknown provider" in e.message, e.message

try:
    client.chat.completions.create(model="limited/model", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("a cooling pool answered")
except openai.RateLimitError as e:
    assert e.status_code == 429
    assert int(e.response.headers["retry-after"]) > 0

print("openai sdk: all checks passed")
