"""mlx-qwen35: Qwen 3.5 in MLX. `platform` is imported first: it loads a fast BLAS before MLX starts."""

from . import platform  # noqa: F401  (must precede every MLX import)
from .cache import restore, snapshot
from .generation import Chat, generate, stream_generate
from .loading import load

__all__ = ["Chat", "generate", "load", "restore", "snapshot", "stream_generate"]
__version__ = "0.1.0"
