#!/usr/bin/env python3
"""Tool calls and structured output through moed with the official `openai` Python client.

    python3 openai_tools.py SOCKET MODEL_ID

Run by `cargo test -p moe-daemon --test tools` against the small trained model with a template
that has Hermes-style tool calls (tests/fixtures/hermes_tools.jinja); it skips when python3, the
`openai` or the `jsonschema` package is missing. The model has never seen a tool call: calls are
forced by `tool_choice`, which holds the reply to the tool-call grammar.
"""

import json
import sys

import jsonschema
import openai

try:  # openai 3.x is built on httpx2 (httpx's successor, same API); older releases on httpx
    import httpx2 as httpx
except ImportError:
    import httpx

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Oslo", "Paris", "Lima"]},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city.",
                 "parameters": WEATHER},
}]


def check_call(call) -> dict:
    assert call.type == "function", call
    assert call.id.startswith("call_") and len(call.id) > 9 and call.id[5:].isalnum(), call.id
    assert call.function.name == "get_weather", call
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER)
    return args


def main() -> None:
    socket, model = sys.argv[1], sys.argv[2]
    http = httpx.Client(transport=httpx.HTTPTransport(uds=socket), timeout=120)
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)

    # Turn 1: a forced call.
    messages = [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "What is the weather in Oslo?"},
    ]
    ask = dict(model=model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
               max_tokens=120, seed=2, temperature=0.7)
    r1 = client.chat.completions.create(messages=messages, **ask)
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls", r1
    assert choice.message.content is None, r1
    assert len(choice.message.tool_calls) == 1, r1
    args = check_call(choice.message.tool_calls[0])

    # The same request streamed: the client reassembles the call from its deltas.
    calls = {}
    finish = None
    for chunk in client.chat.completions.create(messages=messages, stream=True, **ask):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
            assert not c.delta.content, c.delta
            finish = c.finish_reason or finish
    assert finish == "tool_calls", finish
    assert list(calls) == [0], calls
    assert calls[0]["name"] == "get_weather", calls
    assert json.loads(calls[0]["arguments"]) == args, (calls, args)

    # Turn 2: the call and its result go back in; the answer is text. The conversation so far
    # comes from the prompt cache.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                     "content": json.dumps({"temperature": 12, "unit": args["unit"]})})
    r2 = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                        max_tokens=16, seed=2)
    assert r2.choices[0].finish_reason in ("stop", "length"), r2
    assert isinstance(r2.choices[0].message.content, str), r2
    assert not r2.choices[0].message.tool_calls, r2
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens, (r1.usage, r2.usage)
    # Everything up to the reply of turn 1 (the rendered call may tokenize differently).
    assert cached >= r1.usage.prompt_tokens - 2, (cached, r1.usage, r2.usage)

    # Structured output: a json_schema response that validates.
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 10},
            "note": {"type": "string", "maxLength": 12},
        },
        "required": ["answer", "confidence", "note"],
        "additionalProperties": False,
    }
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Is it raining?"}],
            max_tokens=80, seed=seed,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "verdict", "schema": schema, "strict": True}},
        )
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)

    # A schema that does not compile is the client's error.
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "nope"},
                                             "strict": True}},
        )
        raise AssertionError("a bad schema was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format", e.body

    print("openai tools: all checks passed")


if __name__ == "__main__":
    main()
