"""The control plane: scheduling, batching and the engine thread. Imports models, never server."""

import models as _models  # noqa: F401  (loads the optimized BLAS before mlx is imported)
