"""Drive an EngineCore synchronously over a tiny random mlx-lm model (no thread, no server)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models import gemma3_text, llama
from mlx_lm.models.cache import make_prompt_cache

from engine.core import EngineCore
from engine.kv_manager import KVManager
from engine.outputs import StepOutput
from engine.prefix_cache import PrefixCache
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.types import GenerateRequest

EOS = 299


def tiny_llama(seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def tiny_gemma3(seed: int = 0, window: int = 8) -> gemma3_text.Model:
    mx.random.seed(seed)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=300,
        sliding_window=window,
        sliding_window_pattern=3,
    )
    model = gemma3_text.Model(args)
    mx.eval(model.parameters())
    return model


class Harness:
    def __init__(
        self,
        model,
        budget: int = 16,
        max_num_seqs: int = 32,
        prefix_bytes: int = 10**8,
        kv_budget: int = 10**9,
        context_length: int = 1000,
        max_kv_size: int | None = None,
        pipelined: bool | None = None,
        kv_chunk: int = 8,
    ):
        self.outputs: dict[str, list[int]] = {}
        self.finals: dict[str, StepOutput] = {}
        self.kv = KVManager(kv_budget)
        self.prefix = PrefixCache(prefix_bytes, min_tokens=4) if prefix_bytes else None
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=budget,
                max_num_seqs=max_num_seqs,
                max_waiting=256,
                kv_bytes_per_token=1,
                context_length=context_length,
                kv_chunk=kv_chunk,
            ),
            self.kv,
            self.prefix.lookup if self.prefix else (lambda t: 0),
            {EOS},
        )
        self.runner = ModelRunner(
            model, lambda: make_prompt_cache(model, max_kv_size), self.prefix, pipelined
        )
        self.core = EngineCore(self.scheduler, self.runner, self._emit, self.runner.pipelined)

    def _emit(self, seq: Sequence, out: StepOutput) -> None:
        self.outputs.setdefault(seq.id, []).extend(out.token_ids)
        if out.finish_reason is not None:
            self.finals[seq.id] = out

    def run(
        self,
        requests: list[GenerateRequest],
        every: int | None = None,
        abort_at: dict[str, int] | None = None,
    ) -> dict[str, list[int]]:
        """Add one request every `every` steps (all at once if None) and step until idle."""
        pending = list(requests)
        step = 0
        while pending or self.core.has_work:
            while pending and (every is None or step % every == 0):
                self.core.add(Sequence(pending.pop(0)))
                if every is not None:
                    break
            for rid, at in (abort_at or {}).items():
                if at == step:
                    self.core.abort(rid)
            self.core.step()
            step += 1
            assert step < 10_000, "engine did not finish"
        return self.outputs
