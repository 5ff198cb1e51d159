"""CPU execution of the Metal kernel sources in kernels/metal.py: a C++ shim for the Metal subset they
use and a harness that compiles and runs them over the whole grid (see docs/kernels.md)."""

from .harness import bf16_to_f32, emulate, f32_to_bf16, run_kernel

__all__ = ["bf16_to_f32", "emulate", "f32_to_bf16", "run_kernel"]
