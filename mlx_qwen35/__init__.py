"""mlx-qwen35: Qwen 3.5 in MLX. `platform` is imported first: it loads a fast BLAS before MLX starts."""

from . import platform  # noqa: F401  (must precede every MLX import)
from .cache import restore, snapshot
from .loading import load

__all__ = ["load", "snapshot", "restore"]
__version__ = "0.1.0"
