"""Structured output and tool calls end to end: the real server, the default model, the openai
SDK's own helpers (parse, stream), constrained rows batched with free ones."""

from __future__ import annotations

import enum
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def client(live_server: str) -> OpenAI:
    return OpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0, timeout=300)


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)


class Paint(BaseModel):
    color: Color
    liters: int = Field(ge=1, le=20)


class Tags(BaseModel):
    tags: list[str] = Field(min_length=1, max_length=4)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: City


class Order(BaseModel):
    item: str = Field(max_length=30)
    quantity: int = Field(ge=1, le=10)
    express: bool


class Review(BaseModel):
    stars: int = Field(ge=1, le=5)
    comment: str | None = Field(default=None, max_length=60)


class Team(BaseModel):
    members: list[Person] = Field(min_length=1, max_length=3)


class Answer(BaseModel):
    kind: Literal["yes", "no", "maybe"]
    confidence: float = Field(ge=0.0, le=1.0)


class Event(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1900, le=2100)
    colors: list[Color] = Field(max_length=3)


MODELS = [City, Person, Paint, Tags, Address, Order, Review, Team, Answer, Event]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_parse_validates_for_ten_pydantic_models(client: OpenAI, temperature: float) -> None:
    def one(model: type[BaseModel]) -> BaseModel | None:
        done = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": f"Give me an example {model.__name__} as JSON."}],
            response_format=model,
            temperature=temperature,
            seed=3,
            max_tokens=300,
        )
        return done.choices[0].message.parsed

    with ThreadPoolExecutor(len(MODELS)) as pool:
        results = list(pool.map(one, MODELS))
    for model, parsed in zip(MODELS, results):
        assert isinstance(parsed, model), model.__name__


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "maxLength": 40}},
            "required": ["location"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_required_tool_choice_gives_one_valid_call(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        parallel_tool_calls=False,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert not choice.message.content


def test_named_and_none_tool_choice(client: OpenAI) -> None:
    named = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = named.choices[0].message.tool_calls or []
    assert calls and all(c.function.name == "get_time" for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), TIME["function"]["parameters"])
    none = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30
    )
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content
    assert none.choices[0].finish_reason in ("stop", "length")


def test_streamed_calls_reassemble_to_the_same_calls(client: OpenAI) -> None:
    kwargs = dict(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0
    )
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    with client.chat.completions.stream(**kwargs) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    got = [
        (c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls or []
    ]
    want = [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls or []
    ]
    assert got == want and got and all(isinstance(json.loads(a), dict) for _, a in got)
    # The arguments arrive piece by piece, as the model writes them.
    assert kinds.count("tool_calls.function.arguments.delta") > 2 * len(got)
    assert final.choices[0].finish_reason == "tool_calls"


def test_full_tool_round_trip(client: OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": '{"temperature_c": 21, "sky": "sunny"}',
        },
    ]
    second = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        temperature=0,
        max_tokens=60,  # type: ignore[arg-type]
    )
    msg = second.choices[0].message
    assert msg.content and not msg.tool_calls


def test_truncated_json_is_length_not_an_error(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": Person.model_json_schema()},
        },
    )
    assert r.choices[0].finish_reason == "length"


def _strict(schema: dict) -> dict:
    """Objects take no undeclared keys, as in OpenAI's strict mode (the SDK's parse() does this)."""
    if schema.get("type") == "object" or "properties" in schema:
        schema["additionalProperties"] = False
    for value in schema.values():
        children = (
            value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        )
        for child in children:
            if isinstance(child, dict):
                _strict(child)
    return schema


def test_constrained_and_free_streams_share_the_batch(client: OpenAI) -> None:
    schemas = [_strict(m.model_json_schema()) for m in MODELS[:8]]
    free_prompts = [f"Count from {i} to {i + 5} in words." for i in range(8)]

    def free(i: int) -> str:
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": free_prompts[i]}],
            temperature=0 if i % 2 == 0 else 0.8,
            seed=11 + i,
            max_tokens=24,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def constrained(i: int) -> str:
        fmt = {"type": "json_schema", "json_schema": {"name": f"m{i}", "schema": schemas[i]}}
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"An example {MODELS[i].__name__}."}],
            temperature=0.8,
            seed=i,
            max_tokens=300,
            stream=True,
            response_format=fmt,  # type: ignore[arg-type]
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    solo = [free(i) for i in range(8)]
    with ThreadPoolExecutor(16) as pool:
        fs = [pool.submit(free, i) for i in range(8)]
        cs = [pool.submit(constrained, i) for i in range(8)]
        together = [f.result() for f in fs]
        structured = [c.result() for c in cs]
    assert together == solo
    for i, text in enumerate(structured):
        MODELS[i].model_validate_json(text)


class Country(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false in its schema

    name: str = Field(max_length=40)
    capital: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=2000)


def get_current_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
        city: The name of the city

    Returns:
        A short description of the weather
    """
    return f"sunny in {city}"


def test_ollama_format_schema_and_tools(live_server: str) -> None:
    import ollama

    client = ollama.Client(host=live_server, timeout=300)
    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about France."}],
        format=Country.model_json_schema(),
        options={"temperature": 0, "num_predict": 200},
    )
    Country.model_validate_json(r.message.content or "")
    r = client.generate(
        model=MODEL, prompt="A JSON object about Japan.", format="json", options={"temperature": 0}
    )
    assert isinstance(json.loads(r.response), dict)
    r = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Berlin?"}],
        tools=[get_current_weather],
        options={"temperature": 0, "num_predict": 200},
    )
    calls = r.message.tool_calls or []
    assert calls and calls[0].function.name == "get_current_weather"
    assert isinstance(calls[0].function.arguments, dict) and "city" in calls[0].function.arguments
