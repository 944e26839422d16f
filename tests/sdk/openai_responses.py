"""Drives a running keyrelay with the official OpenAI Python SDK's Responses API (run by tests/sdk.rs), as Codex
CLI, the OpenAI Agents SDK and LangChain's use_responses_api do: against a provider that speaks chat (translated)
and one that speaks the Responses API (passed through).

Environment: KEYRELAY_URL (base URL with /v1), KEYRELAY_KEY (the proxy key), KEYRELAY_MODEL, KEYRELAY_NATIVE
(set when the model's provider speaks the Responses API itself). Exits non-zero on any failure.
"""

import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["KEYRELAY_URL"], api_key=os.environ["KEYRELAY_KEY"], max_retries=0)
MODEL = os.environ["KEYRELAY_MODEL"]

# Plain
response = client.responses.create(model=MODEL, instructions="Be brief.", input="Weather in Porto?")
assert response.status == "completed", response
assert response.output_text == "Sunny in Porto.", response
assert response.usage.input_tokens == 11 and response.usage.output_tokens == 7, response.usage

# Streamed, raw events and the SDK's own accumulation
kinds = [event.type for event in client.responses.create(model=MODEL, input="Weather in Porto?", stream=True)]
assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
assert kinds.count("response.output_text.delta") == 2, kinds
with client.responses.stream(model=MODEL, input="Weather in Porto?") as stream:
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert text == "Sunny in Porto." and final.output_text == "Sunny in Porto.", final

# Function tools, continued by previous_response_id
tools = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
first = client.responses.create(model=MODEL, input="Weather in Porto?", tools=tools)
calls = [item for item in first.output if item.type == "function_call"]
assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].arguments == '{"city":"Porto"}', first
second = client.responses.create(
    model=MODEL,
    previous_response_id=first.id,
    tools=tools,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "19 C"}],
)
assert second.output_text == "Sunny in Porto.", second

# Streamed tool call: arguments arrive as deltas and are whole in the final response
with client.responses.stream(model=MODEL, input="Weather in Porto?", tools=tools) as stream:
    final = stream.get_final_response()
call = next(item for item in final.output if item.type == "function_call")
assert call.arguments == '{"city":"Porto"}', final

# An unknown previous response is a clear 400 (a provider that speaks the API judges its own ids)
if not os.environ.get("KEYRELAY_NATIVE"):
    try:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
        raise SystemExit("an unknown previous_response_id was accepted")
    except openai.BadRequestError as e:
        assert e.code == "previous_response_not_found" and e.param == "previous_response_id", e.body

print("openai responses: all checks passed")
