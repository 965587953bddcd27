"""Checks at the engine's boundary: every token id a client can send is a row of the model's table.

An id past the embedding's rows makes MLX's gather read memory it does not own (a segfault, or
silently wrong numbers), so ids are checked here, where every API's request becomes a
GenerateRequest or an embedding batch, rather than in each API's handler. No MLX here.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.errors import InvalidRequestError
from engine.types import GenerateRequest


def check_token_ids(ids: Iterable[object], vocab_size: int, param: str, what: str) -> None:
    """Raise InvalidRequestError(param) unless every id is an int in [0, vocab_size)."""
    for i, tid in enumerate(ids):
        # bool is an int subclass; True as a token id is a client bug, not token 1.
        if type(tid) is not int or not 0 <= tid < vocab_size:
            shown = repr(tid) if len(repr(tid)) <= 24 else repr(tid)[:24] + "..."
            raise InvalidRequestError(
                f"{what} holds an invalid token id {shown} at position {i}: token ids are "
                f"integers from 0 to {vocab_size - 1} for this model",
                param=param,
            )


def check_generate_request(req: GenerateRequest, vocab_size: int) -> None:
    """The prompt ids, the logit_bias keys and the stop token ids of a request."""
    check_token_ids(req.prompt_token_ids, vocab_size, "prompt", "the prompt")
    check_token_ids(req.params.logit_bias, vocab_size, "logit_bias", "logit_bias")
    check_token_ids(req.params.stop_token_ids, vocab_size, "stop", "stop_token_ids")


def check_embedding_inputs(inputs: list[list[int]], vocab_size: int) -> None:
    for n, ids in enumerate(inputs):
        if not ids:
            raise InvalidRequestError(f"input {n} is empty", param="input")
        check_token_ids(ids, vocab_size, "input", f"input {n}")
