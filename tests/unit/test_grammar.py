"""Grammar-constrained decoding: each format's grammar accepts its own outputs, the packed
bitmask is applied exactly, constrained rows produce valid JSON inside a batch, and free rows
are byte-identical with or without constrained neighbours."""

from __future__ import annotations

import json
import random

import llguidance
import mlx.core as mx
import numpy as np
import pytest

from engine.grammar import MaskFiller, RowGrammar
from engine.output.events import OutputSpec, ToolSpec
from engine.output.pipeline import plan_output
from engine.output.reasoning import ReasoningMarkers
from engine.output.strict import closed, strict_error
from engine.sampling import apply_token_mask
from engine.types import GenerateRequest, SamplingParams
from tests.tiny import tiny_tokenizer_json
from tests.unit.engine_harness import EOS, Harness, tiny_llama
from tests.unit.output_fixtures import OUTPUTS, TEMPLATES, TOOLS


@pytest.fixture(scope="module")
def lltok():
    return llguidance.LLTokenizer(tiny_tokenizer_json(), eos_token=EOS)


def _accepts(lltok, lark: str, text: str) -> bool:
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(lark))
    assert not m.is_error(), m.get_error()
    return bool(m.consume_tokens(lltok.tokenize_str(text))) and m.is_accepting()


def _no_special(_text: str) -> None:
    return None


@pytest.mark.parametrize("fmt,text,content,expected", OUTPUTS)
def test_each_format_grammar_accepts_its_outputs(lltok, fmt, text, content, expected):
    if fmt == "llama3" and text.startswith("<|python_tag|>"):
        pytest.skip("the grammar writes bare JSON calls; the parser also reads the tag")
    if fmt == "mistral" and "[ARGS]" in text:
        pytest.skip("the grammar writes the JSON-list form; the parser also reads [ARGS]")
    plan = plan_output(OutputSpec(tools=TOOLS), TEMPLATES[fmt], None, "", _no_special)
    assert plan.grammar is not None
    assert _accepts(lltok, plan.grammar, text), plan.grammar


def test_required_and_named_choice_constrain_from_the_first_token(lltok):
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    required = plan_output(
        OutputSpec(tools=TOOLS, tool_choice="required"), TEMPLATES["hermes"], None, "", _no_special
    )
    assert _accepts(lltok, required.grammar, call)
    assert not _accepts(lltok, required.grammar, "I will not call anything.")
    named = plan_output(
        OutputSpec(tools=TOOLS, tool_choice="named", tool_name="get_weather"),
        TEMPLATES["generic"],
        None,
        "",
        _no_special,
    )
    assert not _accepts(
        lltok, named.grammar, '{"tool_calls": [{"name": "get_time", "arguments": {"tz": "UTC"}}]}'
    )
    assert _accepts(
        lltok,
        named.grammar,
        '{"tool_calls": [{"name": "get_weather", "arguments": {"location": "X"}}]}',
    )
    single = plan_output(
        OutputSpec(tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
        TEMPLATES["hermes"],
        None,
        "",
        _no_special,
    )
    assert not _accepts(lltok, single.grammar, call + "\n" + call)
    assert _accepts(lltok, required.grammar, call + "\n" + call)


NESTED = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
        "tags": {
            "type": "array",
            "items": {"type": "object", "properties": {"k": {"type": "string"}}},
        },
    },
}


@pytest.mark.parametrize("fmt", ["generic", "hermes", "llama3"])
def test_strict_tools_take_no_extra_keys_non_strict_ones_may(lltok, fmt):
    """OpenAI's strict mode: every key of the schema and no other, at any depth; without it,
    JSON Schema's defaults (keys optional, extra keys allowed) stand."""
    args = ['{"city": "Oslo", "where": {"lat": 1}, "tags": [{"k": "a"}]}']
    full = '"where": {"lat": 1}, "tags": [{"k": "a"}]'
    loose = [
        '{"city": "Oslo"}',  # keys left out
        '{"city": "Oslo", "where": {}, "tags": [{}]}',
        f'{{"city": "Oslo", {full}, "country": "NO"}}',  # keys added
        '{"city": "Oslo", "where": {"lat": 1, "lon": 2}, "tags": []}',
        '{"city": "Oslo", "where": {"lat": 1}, "tags": [{"k": "a", "v": "b"}]}',
    ]
    key = "parameters" if fmt == "llama3" else "arguments"

    def call(a: str) -> str:
        body = f'{{"name": "f", "{key}": {a}}}'
        return {
            "generic": f'{{"tool_calls": [{body}]}}',
            "hermes": f"<tool_call>\n{body}\n</tool_call>",
            "llama3": body,
        }[fmt]

    for strict in (False, True):
        spec = OutputSpec(tools=[ToolSpec("f", "", NESTED, strict)], tool_choice="required")
        plan = plan_output(spec, TEMPLATES[fmt], None, "", _no_special)
        assert all(_accepts(lltok, plan.grammar, call(a)) for a in args)
        assert [_accepts(lltok, plan.grammar, call(a)) for a in loose] == [not strict] * 5


def test_a_strict_json_schema_answer_takes_no_extra_keys(lltok):
    for strict in (False, True):
        plan = plan_output(
            OutputSpec(json_schema=NESTED, strict_schema=strict), None, None, "", _no_special
        )
        full = '{"city": "Oslo", "where": {"lat": 1}, "tags": []}'
        assert _accepts(lltok, plan.grammar, full)
        assert _accepts(lltok, plan.grammar, '{"city": "Oslo", "where": {"x": 1}}') is not strict


def test_closing_and_checking_strict_schemas():
    shut = closed(NESTED)
    assert shut["additionalProperties"] is False
    assert shut["properties"]["where"]["additionalProperties"] is False
    assert shut["properties"]["tags"]["items"]["additionalProperties"] is False
    assert shut["required"] == ["city", "where", "tags"]
    assert shut["properties"]["tags"]["items"]["required"] == ["k"]
    assert "additionalProperties" not in NESTED  # the caller's schema is left alone
    assert "required" not in NESTED
    assert strict_error(shut) is None
    assert strict_error(NESTED) is None  # saying nothing is fine: such objects get closed
    partial = {**NESTED, "required": ["city", "tags"]}
    assert "missing 'where'" in (strict_error(partial) or "")
    loose = {
        **shut,
        "properties": {
            **shut["properties"],
            "where": {"type": "object", "additionalProperties": True},
        },
    }
    assert ".properties.where" in (strict_error(loose) or "")


def test_reasoning_stays_free_and_the_answer_is_constrained(lltok):
    markers = ReasoningMarkers("<think>", "</think>")
    spec = OutputSpec(
        json_schema={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    )
    plan = plan_output(spec, None, markers, "", _no_special)
    assert _accepts(lltok, plan.grammar, '<think>any {text} here</think>\n\n{"a": 5}')
    assert _accepts(lltok, plan.grammar, '{"a": 5}')
    assert not _accepts(lltok, plan.grammar, '<think>x</think>{"a": "no"}')


def test_bitmask_applies_exactly():
    rng = np.random.default_rng(0)
    V = 75  # not a multiple of 32: the last word is partial
    mask = rng.integers(-(2**31), 2**31 - 1, size=(3, 3), dtype=np.int64).astype(np.int32)
    mask[1] = -1  # a free row
    logits = mx.array(rng.standard_normal((3, V)).astype(np.float32))
    out = np.array(apply_token_mask(logits, mx.array(mask)))
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").reshape(3, -1)[:, :V]
    want = np.where(bits == 1, np.array(logits), -np.inf)
    assert np.array_equal(out, want)
    assert np.array_equal(out[1], np.array(logits)[1])  # bit for bit


SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "c": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
    },
    "required": ["n", "c", "ok"],
    "additionalProperties": False,
}


def _constrained(lltok, i: int, prompt: list[int]) -> GenerateRequest:
    lark = plan_output(OutputSpec(json_schema=SCHEMA), None, None, "", _no_special).grammar
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(lark))
    params = SamplingParams(
        max_tokens=60, temperature=0.8, seed=50 + i, grammar=RowGrammar(matcher, 300)
    )
    return GenerateRequest(f"c{i}", "m", prompt, params)


def _free(i: int, prompt: list[int], filler: bool = False) -> GenerateRequest:
    seeded = i % 2 == 1
    params = SamplingParams(max_tokens=20, temperature=0.9 if seeded else 0.0, seed=7 + i)
    return GenerateRequest(("n" if filler else "f") + str(i), "m", prompt, params)


def test_constrained_rows_share_the_batch_and_free_rows_are_unchanged(lltok):
    model = tiny_llama()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, EOS - 1) for _ in range(rng.randrange(3, 20))] for _ in range(8)]
    free = [_free(i, p) for i, p in enumerate(prompts[:4])]
    neighbours = [_constrained(lltok, i, p) for i, p in enumerate(prompts[4:])]
    fillers = [_free(i, p, filler=True) for i, p in enumerate(prompts[4:])]
    h = Harness(model)
    with_constrained = h.run([*free, *neighbours])
    with_free = Harness(model).run([*free, *fillers])
    for r in free:
        assert with_constrained[r.request_id] == with_free[r.request_id], r.request_id
    for r in neighbours:
        ids = [t for t in with_constrained[r.request_id] if t != EOS]
        value = json.loads(lltok.decode_str(ids))
        assert set(value) == {"n", "c", "ok"} and 0 <= value["n"] <= 99
        assert value["c"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
        assert with_constrained[r.request_id][-1] == EOS  # the grammar ended it
    assert h.runner.masks.stats.steps > 0


def test_mask_filler_clears_ids_past_the_tokenizer(lltok):
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark('start: "the"'))
    filler = MaskFiller()
    job = filler.start([(0, RowGrammar(m, 290))], 320)
    mask = filler.wait(job)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").reshape(1, -1)
    assert bits[0, 290:].sum() == 0 and bits[0, :290].sum() >= 1
