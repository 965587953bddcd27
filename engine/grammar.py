"""Grammar-constrained decoding with llguidance: compiled off the engine thread, cached, and
filled into a packed token bitmask (32 tokens an int32 word) that sampling applies.

No MLX here: the mask is a numpy array; engine/sampling.py applies it with plain MLX ops, so
one path serves CPU, Metal and CUDA."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from engine.errors import InvalidRequestError

log = logging.getLogger("mlxd.engine")

_CACHE_SIZE = 64


class GrammarCompiler:
    """One model's llguidance tokenizer (built once, ~1 s) and its compiled grammars (an LRU);
    each request gets a copy of the compiled matcher."""

    def __init__(self, hf_tokenizer: Any, eos_ids: set[int]):
        from llguidance.hf import from_tokenizer

        self.tokenizer = from_tokenizer(hf_tokenizer, eos_token=sorted(eos_ids) or None)
        self.vocab_size = self.tokenizer.vocab_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, lark: str, param: str | None = None) -> RowGrammar:
        """A fresh matcher for a Lark grammar; InvalidRequestError naming `param` if invalid."""
        with self._lock:
            cached = self._compiled.get(lark)
            if cached is not None:
                self._compiled.move_to_end(lark)
                return RowGrammar(cached.deep_copy(), self.vocab_size)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise InvalidRequestError(f"invalid grammar: {_first_line(e)}", param) from None
        compiled = llguidance.LLMatcher(self.tokenizer, grammar)
        if compiled.is_error():
            raise InvalidRequestError(f"invalid schema: {_first_line(compiled.get_error())}", param)
        with self._lock:
            self._compiled[lark] = compiled
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return RowGrammar(compiled.deep_copy(), self.vocab_size)

    def special_id(self, text: str) -> int | None:
        """The id of `text` when it is one special token (grammars match those by id)."""
        ids = self.tokenizer.tokenize_str(text)
        if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]):
            return int(ids[0])
        return None


def _first_line(e: object) -> str:
    return (str(e).strip().splitlines() or ["unknown error"])[0][:300]


_compilers: dict[int, tuple[Any, GrammarCompiler]] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    """The compiler of a loaded model's tokenizer (models.tokenizer.Tokenizer), built once."""
    with _compilers_lock:
        hit = _compilers.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    compiler = GrammarCompiler(tokenizer.hf, tokenizer.eos_token_ids)
    with _compilers_lock:
        _compilers[id(tokenizer)] = (tokenizer, compiler)
    return compiler


@dataclass
class MaskStats:
    """How long mask filling took and how much of it the forward pass hid (engine thread)."""

    steps: int = 0
    fill_seconds: float = 0.0  # time spent filling masks (on the worker thread)
    wait_seconds: float = 0.0  # time the engine thread waited for masks after queuing the forward

    @property
    def hidden_fraction(self) -> float:
        if self.fill_seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.wait_seconds / self.fill_seconds)


@dataclass
class MaskJob:
    """Masks for the constrained rows of one step, filled on a worker thread."""

    bitmask: np.ndarray
    rows: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0
    error: BaseException | None = None


def _clear_from(bitmask: np.ndarray, n: int) -> None:
    """Disallow token ids >= n (logits wider than the tokenizer's vocabulary)."""
    word, bit = divmod(n, 32)
    if word < bitmask.shape[1]:
        bitmask[:, word] &= np.int32((1 << bit) - 1)
        bitmask[:, word + 1 :] = 0


class MaskFiller:
    """Fills a step's bitmask on its own thread while the engine thread queues the forward
    pass (llguidance releases the GIL), so mask time hides behind model time."""

    def __init__(self) -> None:
        self._executor = llguidance.LLExecutor()
        self.stats = MaskStats()

    def start(self, grammars: list[tuple[int, RowGrammar]], width: int) -> MaskJob:
        """Start filling the masks of `grammars` ((row, grammar) pairs) for `width` logits."""
        limit = min(g.vocab_size for _, g in grammars)
        bitmask = allocate_token_bitmask(len(grammars), max(width, limit))
        job = MaskJob(bitmask, [r for r, _ in grammars])
        pairs = [(g.matcher, i) for i, (_, g) in enumerate(grammars)]

        def run() -> None:
            t0 = time.perf_counter()
            try:
                fill_next_token_bitmask_par(self._executor, pairs, job.bitmask)
                _clear_from(job.bitmask, limit)
            except BaseException as e:  # surfaces on the engine thread in wait()
                job.error = e
            job.seconds = time.perf_counter() - t0
            job.done.set()

        threading.Thread(target=run, daemon=True, name="mlxd-masks").start()
        return job

    def wait(self, job: MaskJob) -> np.ndarray:
        t0 = time.perf_counter()
        job.done.wait()
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.fill_seconds += job.seconds
        self.stats.steps += 1
        if self.stats.steps % 200 == 0:
            st = self.stats
            log.info(
                "grammar masks: %d steps, filling %.1f ms a step, %.0f%% hidden by the forward",
                st.steps,
                1000 * st.fill_seconds / st.steps,
                100 * st.hidden_fraction,
            )
        if job.error is not None:
            raise job.error
        return job.bitmask


@dataclass
class RowGrammar:
    """One request's matcher: masks its next token, consumes what it sampled."""

    matcher: llguidance.LLMatcher
    vocab_size: int  # the tokenizer's; logits columns past it are never allowed

    @property
    def active(self) -> bool:
        return not self.matcher.is_error()

    def accept(self, token: int) -> bool:
        if self.matcher.is_stopped():  # done: what follows (ignore_eos) is not its business
            return True
        return bool(self.matcher.consume_token(token))


def schema_error(schema: Any) -> str | None:
    """Why a JSON schema cannot constrain output (invalid, or a keyword llguidance does not
    implement, named), or None when it can. No tokenizer needed."""
    import json

    if not isinstance(schema, dict):
        return "a JSON schema must be an object"
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as e:
        return _first_line(e)
    return _first_line(error) if error else None
