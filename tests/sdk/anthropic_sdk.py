"""Drives a running keyrelay with the official Anthropic Python SDK (run by tests/sdk.rs), as Claude Code and
tools built on the Anthropic API do: against a provider that speaks OpenAI's API (translated) and one that
speaks Anthropic's (passed through), both answering the same conversation.

Environment: KEYRELAY_URL (base URL with /v1), KEYRELAY_KEY (the proxy key), KEYRELAY_MODEL (the model to ask),
KEYRELAY_NATIVE (set when its provider speaks the Messages API). Exits non-zero on any failure.
"""

import os

import anthropic

base_url = os.environ["KEYRELAY_URL"].removesuffix("/v1")
key = os.environ["KEYRELAY_KEY"]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
MODEL = os.environ["KEYRELAY_MODEL"]
NATIVE = bool(os.environ.get("KEYRELAY_NATIVE"))
ask = [{"role": "user", "content": "Weather in Porto?"}]

# Create
message = client.messages.create(model=MODEL, max_tokens=100, system="Be brief.", messages=ask)
assert message.type == "message" and message.role == "assistant", message
assert message.content[0].type == "text" and message.content[0].text == "Sunny in Porto.", message
assert message.stop_reason == "end_turn", message
assert message.usage.input_tokens == 11 and message.usage.output_tokens == 7, message.usage

# The same key as a bearer token (Claude Code's ANTHROPIC_AUTH_TOKEN)
bearer = anthropic.Anthropic(base_url=base_url, auth_token=key, max_retries=0)
assert bearer.messages.create(model=MODEL, max_tokens=100, messages=ask).content[0].text == "Sunny in Porto."

# Stream, through the SDK's own accumulation
with client.messages.stream(model=MODEL, max_tokens=100, messages=ask) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == "Sunny in Porto.", text
assert final.content[0].text == "Sunny in Porto." and final.stop_reason == "end_turn", final
assert final.usage.output_tokens == 2, final.usage

# Raw stream events, in order
kinds = [event.type for event in client.messages.create(model=MODEL, max_tokens=100, messages=ask, stream=True)]
assert kinds == [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
], kinds

# Tools, a round trip: the call, then its result
tools = [
    {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
call = client.messages.create(model=MODEL, max_tokens=100, messages=ask, tools=tools)
assert call.stop_reason == "tool_use", call
use = call.content[0]
assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Porto"}, use
answer = client.messages.create(
    model=MODEL,
    max_tokens=100,
    tools=tools,
    messages=ask
    + [
        {"role": "assistant", "content": call.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "19 C"}]},
    ],
)
assert answer.content[0].text == "Sunny in Porto.", answer

# Streamed tool use: the SDK assembles the input from input_json_delta events
with client.messages.stream(model=MODEL, max_tokens=100, messages=ask, tools=tools) as stream:
    final = stream.get_final_message()
assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Porto"}, final

# count_tokens
counted = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=ask, tools=tools)
assert counted.input_tokens > 10, counted

# Errors raise the SDK's own exception types
try:
    anthropic.Anthropic(base_url=base_url, api_key="wrong-key", max_retries=0).messages.create(
        model=MODEL, max_tokens=10, messages=ask
    )
    raise SystemExit("a wrong proxy key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401 and e.body["error"]["type"] == "authentication_error", e.body

try:
    client.messages.create(model="nobody/model", max_tokens=10, messages=ask)
    raise SystemExit("an unknown provider was accepted")
except anthropic.NotFoundError as e:
    assert "unknown provider" in e.message, e.message

try:
    client.messages.create(model="limited/model", max_tokens=10, messages=ask)
    raise SystemExit("a cooling pool answered")
except anthropic.RateLimitError as e:
    assert int(e.response.headers["retry-after"]) > 0

if not NATIVE:
    try:
        client.messages.create(
            model=MODEL, max_tokens=10, messages=ask, tools=[{"type": "web_search_20250305", "name": "web_search"}]
        )
        raise SystemExit("a server tool was accepted for an OpenAI provider")
    except anthropic.BadRequestError as e:
        assert e.body["error"]["type"] == "invalid_request_error" and "server tool" in e.message, e.body

print(f"anthropic sdk ({'native' if NATIVE else 'translated'}): all checks passed")
