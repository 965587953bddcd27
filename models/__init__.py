"""Weights and numerics: model discovery, loading, GGUF import, memory. Knows nothing of batching or HTTP."""

from models.blas import preload as _preload_blas

# Must run before anything imports mlx: see models/blas.py.
_preload_blas()
