#!/usr/bin/env python3
"""Talks to moed with the official `openai` Python client over the daemon's UNIX socket.

    python3 openai_client.py SOCKET MODEL_ID

The client speaks HTTP through an httpx transport bound to the socket; the host name in the base
URL is not used. Run by `cargo test -p moe-daemon --test api` (which skips it when python3 or the
package is missing); also usable by hand against a running daemon.
"""

import sys

import openai

try:  # openai 3.x is built on httpx2 (httpx's successor, same API); older releases on httpx
    import httpx2 as httpx
except ImportError:
    import httpx


def main() -> None:
    socket, model = sys.argv[1], sys.argv[2]
    http = httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=60)
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)

    models = client.models.list()
    assert [m.id for m in models.data] == [model], models

    c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, seed=3)
    assert c.object == "text_completion", c
    assert c.usage.completion_tokens <= 12 and c.usage.prompt_tokens > 0, c.usage
    text = c.choices[0].text

    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=12, seed=3, stream=True
        )
        if chunk.choices
    )
    assert streamed == text, (streamed, text)

    messages = [{"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, seed=5, temperature=0.5,
        top_p=0.9, stop=["\n\n"],
    )
    assert r.choices[0].message.role == "assistant", r
    reply = r.choices[0].message.content
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, seed=5, temperature=0.5,
        top_p=0.9, stop=["\n\n"], stream=True, stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    assert "".join(pieces) == reply, (pieces, reply)
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

    # llama.cpp's extra sampling parameters pass through extra_body.
    client.completions.create(
        model=model, prompt="x", max_tokens=3,
        extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1},
    )

    # Errors arrive as the client's typed exceptions.
    try:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=3)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    try:
        client.completions.create(model=model, prompt="x", max_tokens=100000)
        raise AssertionError("max_tokens out of range accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "max_tokens", e.body

    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
