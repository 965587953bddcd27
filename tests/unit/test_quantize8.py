"""8-bit group-32 quantization in one pass (kernels/quantize.cpp): the bits mx.quantize gives."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import models  # noqa: F401  (BLAS before mlx)
from models import qkernels

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


def _same_as_mlx(w: mx.array) -> bool:
    ref = mx.quantize(w.astype(mx.float32), group_size=32, bits=8)
    got = qkernels.quantize8(w)
    mx.eval(ref, got)
    return all(a.dtype == b.dtype and mx.array_equal(a, b).item() for a, b in zip(got, ref))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (300, 640), (2, 5, 64)])
def test_random_weights_quantize_as_mlx_does(dtype, shape: tuple[int, ...]) -> None:
    mx.random.seed(sum(shape))
    assert _same_as_mlx((mx.random.normal(shape) * 0.05).astype(dtype))


def test_the_edge_cases_of_the_scale_quantize_as_mlx_does() -> None:
    groups = [
        np.zeros(32),  # nothing to span: the smallest scale
        np.ones(32),  # one value: it is the edge, exactly
        np.full(32, -3.0),
        np.linspace(-5, 1, 32),  # the low edge is the larger
        np.linspace(-1, 5, 32),
        np.full(32, 1e-9),  # the edge rounds to level 0: bias 0
        np.r_[np.full(16, 7.0), np.linspace(0, 1e-6, 16)],
        np.r_[np.zeros(31), [65504.0]],  # float16's largest
        np.r_[np.full(31, -0.5), [0.25]],
    ]
    w = mx.array(np.stack(groups).reshape(3, -1).astype(np.float32))
    assert _same_as_mlx(w)
    assert _same_as_mlx(w.astype(mx.float16))
    assert _same_as_mlx(w.astype(mx.bfloat16))


def test_a_strided_view_and_a_background_stream_give_the_same_bits() -> None:
    mx.random.seed(5)
    w = mx.random.normal((64, 512)) * 0.1
    assert _same_as_mlx(w.T)  # [512, 64], not row-contiguous
    ref = qkernels.quantize8(w)
    mx.eval(ref)
    got: list = []

    def alone() -> None:  # a background stream runs every chunk on its own thread
        assert qkernels.background_stream(mx.default_stream(mx.cpu))
        out = qkernels.quantize8(w)
        mx.eval(out)
        got.extend(out)

    t = threading.Thread(target=alone)
    t.start()
    t.join()
    assert all(mx.array_equal(a, b).item() for a, b in zip(got, ref))


def test_widths_the_kernel_does_not_take_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        qkernels._ext.quantize8(mx.zeros((2, 48)))  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="float"):
        qkernels._ext.quantize8(mx.zeros((2, 32), dtype=mx.int32))  # type: ignore[union-attr]
