"""Hugging Face Qwen 3.5 checkpoints (float or block-FP8) to mlx_qwen35 checkpoints, optionally quantised.

    python -m convert SOURCE OUTPUT [--bits 4|8] [--group-size 64] [--dtype bfloat16] [--check]

Python: `from convert.convert import convert, main` (main(argv) is the command line) and
`from convert.check import check_conversion`.
"""

from .check import CheckResult, check_conversion
from .convert import ConversionReport, ConvertError, main

__all__ = ["CheckResult", "ConversionReport", "ConvertError", "check_conversion", "main"]
