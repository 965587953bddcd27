"""The output pipeline of one request: detokenize -> stop strings -> reasoning -> tool calls.

Pure Python (no MLX): every API's output passes through it once, on the engine side of the
async boundary, and reaches the server as typed deltas.
"""
