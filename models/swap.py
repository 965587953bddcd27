"""Replacing a loaded model's submodules in place through nn.Module's public `update_modules`
(how mlxd puts its CPU layouts, kernels and fused layers under mlx-lm's models; no patching)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.nn as nn
from mlx.utils import tree_unflatten


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` ("model.layers.3.mlp"; lists stay lists)."""
    model.update_modules(tree_unflatten([(name, new)]))


def swap_modules(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every submodule `make` returns a replacement for; returns how many. The
    replacements are all made first, so `make` sees the model as it was."""
    swaps = [(name, new) for name, m in model.named_modules() if (new := make(m)) is not None]
    for name, new in swaps:
        replace_module(model, name, new)
    return len(swaps)
