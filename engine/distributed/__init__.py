"""One model served across the processes `mlx.launch` starts (`mlxd serve --distributed MODE`).

Rank 0 runs the HTTP server, the registry and the scheduler; before each step it sends the step's
plan over `mx.distributed` itself, and every rank runs the same ModelRunner calls over its part of
the model in lockstep. Only rank 0 samples and streams. Collectives need every rank to run the
identical sequence of ops, so nothing a rank decides alone may change what it computes.
"""
