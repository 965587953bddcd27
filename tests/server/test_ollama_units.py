"""Ollama API pieces without HTTP: keep_alive, options -> SamplingParams, templates, Host check."""

from __future__ import annotations

import pytest

from engine.api import ModelHandle
from engine.types import RequestMetrics
from server.chat import completion_budget, usable_context
from server.errors import APIError
from server.hostcheck import host_allowed, host_of
from server.ollama.management import parameter_size, quantization_level
from server.ollama.options import (
    OptionError,
    budget_options,
    final_stats,
    parse_keep_alive,
    sampling_params,
)
from server.ollama.prompt import generate_prompt, render_go_template
from tests.server.fake_engine import FakeTokenizer, fake_status


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("10s", 10.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("0", 0.0),
        (0, 0.0),
        (3600, 3600.0),
        ("3600", 3600.0),
        (-1, -1.0),
        ("-1", -1.0),
        ("-1m", -1.0),
        (2.5, 2.5),
    ],
)
def test_keep_alive_parsing(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "m5", "5x", "1h-", True, [1]])
def test_keep_alive_rejects_garbage(bad):
    with pytest.raises(OptionError) as e:
        parse_keep_alive(bad)
    assert e.value.status == 400


def test_options_map_onto_sampling_params():
    p = sampling_params(
        {
            "temperature": 0.2,
            "top_k": 5,
            "top_p": 0.5,
            "min_p": 0.05,
            "repeat_penalty": 1.3,
            "repeat_last_n": 32,
            "presence_penalty": 0.4,
            "frequency_penalty": 0.6,
            "seed": 7,
            "stop": ["\n", "user:"],
        },
        max_tokens=42,
    )
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.2, 5, 0.5, 0.05)
    assert (p.repetition_penalty, p.repeat_last_n) == (1.3, 32)
    assert (p.presence_penalty, p.frequency_penalty, p.seed) == (0.4, 0.6, 7)
    assert p.stop == ["\n", "user:"] and p.max_tokens == 42


def test_absent_options_take_ollamas_defaults():
    p = sampling_params({"temperature": None}, max_tokens=10)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.8, 40, 0.9, 1.1)
    assert p.seed is None and p.stop == []


@pytest.mark.parametrize(
    "opts", [{"temperature": -1}, {"top_p": 2}, {"top_k": "x"}, {"repeat_penalty": 0}]
)
def test_bad_options_are_400(opts):
    with pytest.raises(APIError) as e:
        sampling_params(opts, max_tokens=1)
    assert e.value.status == 400


def test_budget_num_ctx_and_num_predict():
    def budget(options: dict, prompt: int = 10, model_ctx: int = 256) -> tuple[int, int]:
        num_predict, num_ctx = budget_options(options)
        handle = ModelHandle("m", fake_status(context_length=model_ctx), None)
        ctx = usable_context(handle, num_ctx)
        return ctx, completion_budget(prompt, ctx, num_predict, "clamp", "num_predict")

    assert budget({}) == (256, 246)  # Ollama's -1: until the context ends
    assert budget({"num_predict": -1}) == (256, 246)
    assert budget({"num_predict": 5}) == (256, 5)
    assert budget({"num_predict": 500}) == (256, 246)  # clamped to the context, as Ollama does
    assert budget({"num_ctx": 64}) == (64, 54)
    assert budget({"num_ctx": 4096}) == (256, 246)  # never above the model's
    with pytest.raises(APIError):
        budget({"num_ctx": 0})
    with pytest.raises(APIError, match="maximum context length is 64"):
        budget({"num_ctx": 64}, prompt=64)  # not one token fits


def test_final_stats_are_integer_nanoseconds():
    m = RequestMetrics(prompt_tokens=3, completion_tokens=4, prefill_time=0.5, decode_time=1.25)
    s = final_stats(m, total=2.0, load=0.1)
    assert s == {
        "total_duration": 2_000_000_000,
        "load_duration": 100_000_000,
        "prompt_eval_count": 3,
        "prompt_eval_duration": 500_000_000,
        "eval_count": 4,
        "eval_duration": 1_250_000_000,
    }
    assert all(isinstance(v, int) for v in s.values())


def test_go_template_subset():
    t = "{{ if .System }}S:{{ .System }}\n{{ end }}U:{{ .Prompt }}\nA:{{ .Response }}"
    assert render_go_template(t, {"System": "be nice", "Prompt": "hi"}) == "S:be nice\nU:hi\nA:"
    assert render_go_template(t, {"Prompt": "hi"}) == "U:hi\nA:"
    t2 = "{{- if .System }}x{{ else }}y{{ end -}}"
    assert render_go_template(t2, {}) == "y"
    with pytest.raises(APIError):
        render_go_template("{{ if .System }}open", {})
    with pytest.raises(APIError):
        render_go_template("{{ range .Messages }}{{ end }}", {})


def test_generate_prompt_modes():
    chat = FakeTokenizer()
    base = FakeTokenizer(chat_template=None)
    assert generate_prompt(chat, "hi", None, None, raw=True).text == "hi"
    templated = generate_prompt(chat, "hi", "sys", None, raw=False)
    assert templated.text == "<system>sys\n<user>hi\n<assistant>"
    assert templated.add_special_tokens is False
    assert generate_prompt(base, "hi", None, None, raw=False).text == "hi"
    assert generate_prompt(base, "hi", "sys", None, raw=False).text == "sys\n\nhi"
    assert generate_prompt(chat, "hi", None, "Q:{{ .Prompt }}", raw=False).text == "Q:hi"


@pytest.mark.parametrize(
    ("host", "bind", "ok"),
    [
        ("localhost:11434", "127.0.0.1", True),
        ("127.0.0.1:11434", "127.0.0.1", True),
        ("[::1]:11434", "127.0.0.1", True),
        ("app.localhost", "127.0.0.1", True),
        (None, "127.0.0.1", True),
        ("evil.example.com", "127.0.0.1", False),
        ("evil.example.com:11434", "localhost", False),
        ("192.168.1.5:11434", "127.0.0.1", False),
        ("evil.example.com", "0.0.0.0", True),  # not loopback-bound: the operator chose exposure
        ("myhost:80", "::1", False),
    ],
)
def test_host_check(host, bind, ok):
    assert host_allowed(host, bind) is ok


def test_host_of():
    assert host_of("[::1]:8080") == "::1"
    assert host_of("a.b:1") == "a.b"
    assert host_of("::1") == "::1"


def test_model_detail_formatting():
    assert parameter_size(134_515_008) == "135M"
    assert parameter_size(8_030_261_248) == "8.0B"
    assert quantization_level("q4_1 (4-bit, group 32)") == "Q4_1"
    assert quantization_level("f16") == "F16"
