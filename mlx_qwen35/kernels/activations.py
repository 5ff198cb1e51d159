"""SiLU, sigmoid and softmax for float32 on the CPU. MLX's CPU backend takes exp one value at a time (about 12 ns a
value on these x86 machines against 0.2-0.4 ns for a multiply), and a Qwen3.5-0.8B prefill takes about half
a million SiLUs per token. Here exp is a Cody-Waite range reduction and a degree-7 polynomial in multiplies
and adds, compiled into one loop: within 2e-7 relative of float64 over float32's range (MLX's own exp:
4e-6). Other devices and dtypes use MLX's ops, the reference these are checked against; so does training
(`exact`)."""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

LN2_HIGH, LN2_LOW = 0.693145751953125, 1.42860682030941723212e-6  # ln 2 = high + low, high exact in 12 bits
ROUND = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 below 2^22 to an integer


def _exp(x):
    x = mx.clip(x, -87.0, 88.0)  # exp(-87) is still a normal float32, exp(88) still finite
    # round(x / ln 2): a step function of x, so no gradient flows through it (d/dx exp(x) = p'(r) 2^n)
    n = mx.stop_gradient((x * 1.4426950408889634 + ROUND) - ROUND)
    r = x - n * LN2_HIGH - n * LN2_LOW  # |r| <= ln(2) / 2
    p = r * (1 / 5040) + 1 / 720  # Taylor to r^7: relative error below 2e-8 on |r| <= 0.35
    for c in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = p * r + c
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)  # p * 2^n, built in the exponent bits


@mx.compile
def _silu(x):
    return x / (1.0 + _exp(-x))


@mx.compile
def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@mx.compile
def _softmax(x):
    e = _exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_exact_depth = 0


@contextmanager
def exact():
    """MLX's own activations inside this block. Training runs in it, so a training run's numbers (and the
    default model's reproduction from its seed) do not depend on this inference speed-up."""
    global _exact_depth
    _exact_depth += 1
    try:
        yield
    finally:
        _exact_depth -= 1


def fast_path(x) -> bool:
    """Whether these functions take the polynomial path for `x` (also for callers choosing between a fused MLX
    op and a composition of these)."""
    return not _exact_depth and x.dtype == mx.float32 and mx.default_device() == mx.cpu


def silu(x):
    return _silu(x) if fast_path(x) else nn.silu(x)


def sigmoid(x):
    return _sigmoid(x) if fast_path(x) else mx.sigmoid(x)


def softmax(x):
    """Over the last axis."""
    return _softmax(x) if fast_path(x) else mx.softmax(x, axis=-1)
