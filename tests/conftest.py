import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx_qwen35  # noqa: E402,F401  (first: it loads OpenBLAS before anything imports MLX)
