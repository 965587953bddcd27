"""The output pipeline: tool-call formats, reasoning split, template detection, streamed text
cut at every character (a marker cut across chunks never reaches the content)."""

from __future__ import annotations

import json

import pytest

from engine.detokenizer import Detokenizer
from engine.output.events import OutputDelta, OutputSpec
from engine.output.formats import detect_tool_format, make_parser
from engine.output.pipeline import OutputPipeline, plan_output
from engine.output.prompting import tool_messages
from engine.output.reasoning import ReasoningMarkers, ReasoningSplitter, detect_reasoning
from tests.unit.output_fixtures import OUTPUTS, TEMPLATES, TOOLS

MARKUP = ("<tool_call", "</tool_call", "<function=", "[TOOL_CALLS", "<|python_tag", '{"name"')
THINK = ReasoningMarkers("<think>", "</think>")


def _splits(text: str):
    """The text whole, one character at a time, and cut in two at every position."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def _run_parser(fmt: str, pieces: list[str], deltas: list | None = None):
    parser = make_parser(fmt, TOOLS)
    content, calls = "", []
    for p in pieces:
        c, got = parser.feed(p)
        content += c
        calls += got
        if deltas is not None:
            deltas.append(parser.take_deltas())
    c, got = parser.finish()
    if deltas is not None:
        deltas.append(parser.take_deltas())
    return content + c, calls + got


@pytest.mark.parametrize("fmt", list(TEMPLATES))
def test_template_detection(fmt):
    assert detect_tool_format(TEMPLATES[fmt]) == fmt


@pytest.mark.parametrize("fmt,text,content,expected", OUTPUTS)
def test_tool_parsers_at_every_split(fmt, text, content, expected):
    want_content = text if content is None else content
    for pieces in _splits(text):
        got_content, calls = _run_parser(fmt, pieces)
        assert got_content == want_content, pieces
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected, pieces
        assert [c.index for c in calls] == list(range(len(expected)))
        if expected:
            assert not any(m in got_content for m in MARKUP)


@pytest.mark.parametrize("fmt,text,content,expected", [o for o in OUTPUTS if o[3]])
def test_tool_call_arguments_stream_piece_by_piece(fmt, text, content, expected):
    """The first piece of a call has its id and name; the fragments add up to the arguments;
    char by char, they arrive in many pieces, each call's before the next call begins."""
    for pieces in _splits(text):
        steps: list = []
        _, calls = _run_parser(fmt, pieces, steps)
        flat = [d for step in steps for d in step]
        for call in calls:
            mine = [d for d in flat if d.index == call.index]
            assert (mine[0].id, mine[0].name) == (call.id, call.name), pieces
            assert all(d.id is None and d.name is None for d in mine[1:])
            assert "".join(d.arguments for d in mine) == call.arguments, pieces
            assert [d.done for d in mine] == [False] * (len(mine) - 1) + [True]
            if len(pieces) == len(text):
                assert sum(bool(d.arguments) for d in mine) >= 3, (fmt, mine)
        assert [d.index for d in flat] == sorted(d.index for d in flat)


def test_a_call_cut_short_streams_its_start_but_never_completes():
    steps: list = []
    text = '{"tool_calls": [{"name": "get_weather", "arguments": {"location": "Par'
    content, calls = _run_parser("generic", list(text), steps)
    flat = [d for step in steps for d in step]
    assert (content, calls) == ("", [])
    assert flat[0].name == "get_weather" and not any(d.done for d in flat)
    assert "".join(d.arguments for d in flat) == '{"location": "Par'


def test_truncated_call_is_dropped_not_shown():
    for fmt, text in [
        ("hermes", 'Hi <tool_call>\n{"name": "get_weather", "argum'),
        ("mistral", 'Hi [TOOL_CALLS][{"name": "get_weather", "argu'),
        ("qwen3_coder", "Hi <tool_call>\n<function=get_weather>\n<parameter=loc"),
    ]:
        content, calls = _run_parser(fmt, [text])
        assert content == "Hi " and calls == [], fmt


def test_call_ids_are_unique():
    _, calls = _run_parser("hermes", [OUTPUTS[0][1]])
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


REASONING = "<think>\nThe user wants 2+2. That is 4 </thi not yet.\n</think>\n\nThe answer is 4."


def test_reasoning_split_at_every_cut():
    for pieces in _splits(REASONING):
        s = ReasoningSplitter(THINK)
        reasoning = content = ""
        seen_content = False
        for p in pieces:
            r, c = s.feed(p)
            assert not (r and seen_content), "reasoning after content"
            seen_content |= bool(c)
            reasoning, content = reasoning + r, content + c
        r, c = s.finish()
        reasoning, content = reasoning + r, content + c
        assert reasoning == "The user wants 2+2. That is 4 </thi not yet.\n"
        assert content == "The answer is 4."


def test_reasoning_opened_by_the_prompt_and_absent():
    s = ReasoningSplitter(THINK, in_reasoning=True)
    assert s.feed("hmm</think>ok") == ("hmm", "ok")
    s = ReasoningSplitter(THINK)
    r, c = s.feed("<thin")
    assert (r, c) == ("", "")
    assert s.finish() == ("", "<thin")  # not a marker after all: it was the answer
    s = ReasoningSplitter(THINK)
    assert s.feed("Plain answer <think> later") == ("", "Plain answer <think> later")


def test_reasoning_markers_from_the_vocabulary():
    assert detect_reasoning({"<think>": 1, "</think>": 2}) == THINK
    assert detect_reasoning({"<|channel>": 1, "<channel|>": 2}).start == "<|channel>thought"
    assert detect_reasoning({"hello": 1}) is None


def _char_decode(ids: list[int], **_: object) -> str:
    return "".join(chr(i) for i in ids)


def test_pipeline_reasoning_then_tool_calls_with_stop_string():
    text = (
        '<think>call it</think>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
        "</tool_call>STOPHERE and more"
    )
    spec = OutputSpec(tools=TOOLS)
    plan = plan_output(spec, TEMPLATES["hermes"], THINK, "assistant\n", lambda s: None)
    assert plan.tool_format == "hermes" and plan.grammar is not None
    for pieces in _splits(text):
        pipe = OutputPipeline(Detokenizer(_char_decode, stop=["STOPHERE"]), plan)
        total = OutputDelta()
        for p in pieces:
            total.extend(pipe.add([ord(ch) for ch in p]))
            if pipe.stopped:
                break
        total.extend(pipe.finish_stopped() if pipe.stopped else pipe.flush())
        assert total.reasoning == "call it"
        assert total.content == ""
        assert [(c.name, c.arguments) for c in total.tool_calls] == [("get_time", '{"tz": "UTC"}')]
        assert [(d.id, d.name, d.arguments, d.done) for d in total.call_deltas] == [
            (total.tool_calls[0].id, "get_time", '{"tz": "UTC"}', True)
        ]


def test_reasoning_tokens_are_counted_through_the_end_marker():
    vocab = ["<think>", "\n", "Let", " me", " think", "</think>", "\n\n", "Answer", "."]
    spec = OutputSpec()

    def decode(ids: list[int], **_: object) -> str:
        return "".join(vocab[i] for i in ids)

    for in_prompt in (False, True):
        plan = plan_output(spec, None, THINK, "<think>" if in_prompt else "", lambda s: None)
        pipe = OutputPipeline(Detokenizer(decode), plan)
        ids = list(range(1 if in_prompt else 0, len(vocab)))
        for i in ids:
            pipe.add([i])
        pipe.flush()
        assert pipe.reasoning_tokens == 5 if in_prompt else 6  # through "</think>"
    # Char by char, a start marker cut across tokens counts from its first piece.
    pipe = OutputPipeline(
        Detokenizer(_char_decode), plan_output(spec, None, THINK, "", lambda s: None)
    )
    for ch in REASONING:
        pipe.add([ord(ch)])
    assert pipe.reasoning_tokens == REASONING.index("</think>") + len("</think>")
    # No thinking block: nothing counted.
    pipe = OutputPipeline(
        Detokenizer(_char_decode), plan_output(spec, None, THINK, "", lambda s: None)
    )
    for ch in "<b>Plain</b>":
        pipe.add([ord(ch)])
    assert pipe.reasoning_tokens == 0


def test_generic_prompt_describes_tools_and_rewrites_history():
    spec = OutputSpec(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"location": "Rome"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    msgs, kwargs = tool_messages(spec, TEMPLATES["generic"], history)
    assert kwargs == {}
    assert msgs[0]["content"].startswith("Be brief.") and "get_weather" in msgs[0]["content"]
    assert "exactly one tool call" in msgs[0]["content"]
    assert json.loads(msgs[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"location": "Rome"}}]
    }
    assert json.loads(msgs[3]["content"]) == {"tool_response": "sunny"}
    msgs, kwargs = tool_messages(spec, TEMPLATES["hermes"], history)
    assert msgs is history and kwargs["tools"][0]["function"]["name"] == "get_weather"


GENERIC_ANSWER = '{"response": "Say \\"hi\\" to caf\\u00e9, \u00e9t\u00e9 and \\ud83d\\ude00\\n"}'


def test_generic_answer_streams_decoded_at_every_split():
    want = 'Say "hi" to caf\u00e9, \u00e9t\u00e9 and \U0001f600\n'
    for pieces in _splits(GENERIC_ANSWER):
        parser = make_parser("generic", TOOLS)
        content, streamed = "", 0
        for p in pieces:
            c, calls = parser.feed(p)
            content += c
            streamed += bool(c)
            assert not calls
        c, calls = parser.finish()
        assert content + c == want and not calls, pieces
        if len(pieces) == len(GENERIC_ANSWER):  # char by char: it arrives as it is written
            assert streamed > 20


def test_generic_cut_by_max_tokens_shows_no_envelope():
    content, calls = _run_parser("generic", ['{"response": "Hello wor'])
    assert (content, calls) == ("Hello wor", [])
    content, calls = _run_parser("generic", ['{"tool_calls": [{"name": "get_weather", "argu'])
    assert (content, calls) == ("", [])
