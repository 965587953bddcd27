"""Weights and numerics: model discovery, loading, GGUF import, memory. Knows nothing of batching or HTTP.

Importing it loads nothing: processes that run MLX call models.blas.preload() first.
"""
