"""A Gradio chat app over mlx_qwen35's Chat: `python -m app` (needs the `app` extra: pip install -e '.[app]')."""

from .engine import Engine, Settings
from .ui import build_app, launch, main

__all__ = ["Engine", "Settings", "build_app", "launch", "main"]
