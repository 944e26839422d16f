"""Drives a running keyrelay with LiteLLM's async client, as LiteLLM's Router and proxy call it (run by
tests/sdk.rs). aiohttp, under it, refuses header values that are not ASCII.

Environment: KEYRELAY_URL (base URL with /v1), KEYRELAY_KEY (the proxy key). Exits non-zero on any failure.
"""

import asyncio
import os

import litellm

base_url = os.environ["KEYRELAY_URL"]
key = os.environ["KEYRELAY_KEY"]


async def main():
    # LiteLLM's "openai/" prefix means "an OpenAI-compatible server"; the rest is keyrelay's provider/model.
    reply = await litellm.acompletion(
        model="openai/mock/gpt-sdk",
        api_base=base_url,
        api_key=key,
        messages=[{"role": "user", "content": "hi"}],
        num_retries=0,
    )
    assert reply.choices[0].message.content == "Hello from the SDK test", reply

    text = ""
    stream = await litellm.acompletion(
        model="openai/mock/gpt-sdk",
        api_base=base_url,
        api_key=key,
        messages=[{"role": "user", "content": "stream"}],
        stream=True,
        num_retries=0,
    )
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
    assert text == "Hello from the SDK test", text

    embedded = await litellm.aembedding(
        model="openai/mock/embed", api_base=base_url, api_key=key, input=["a", "b"]
    )
    assert len(embedded.data) == 2, embedded

    try:
        await litellm.acompletion(
            model="openai/limited/model",
            api_base=base_url,
            api_key=key,
            messages=[{"role": "user", "content": "hi"}],
            num_retries=0,
        )
        raise SystemExit("a cooling pool answered")
    except litellm.RateLimitError:
        pass

    print("litellm async: all checks passed")


asyncio.run(main())
