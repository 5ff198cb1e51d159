import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx_qwen35  # noqa: E402,F401  (first: it loads OpenBLAS before anything imports MLX)

import pytest  # noqa: E402


@pytest.fixture
def typed_lines(monkeypatch):
    """`typed_lines("a", "b")`: `input()` returns these lines in turn, then raises EOFError (Ctrl-D)."""
    def typing(*lines):
        remaining = iter(lines)

        def fake_input(prompt=""):
            try:
                return next(remaining)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)

    return typing
