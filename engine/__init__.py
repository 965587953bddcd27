"""The control plane: scheduling, batching and the engine thread. Imports models, never server."""
