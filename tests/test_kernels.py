"""The delta-rule scan paths against a float64 NumPy recurrence (fla-style grid over odd sizes)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35 import kernels
from mlx_qwen35.kernels import gated_delta_chunked, gated_delta_recurrent, gated_delta_update
from mlx_qwen35.kernels.chunked import unit_lower_inverse
from delta_reference import numpy_recurrence, random_inputs, rel, to_mx

GRID = [  # B, T, Hk, Hv, D
    (1, 1, 2, 2, 64), (3, 2, 2, 4, 64), (1, 63, 2, 8, 64), (3, 64, 2, 2, 128), (1, 65, 2, 4, 128),
    (2, 200, 1, 4, 64), (1, 1000, 2, 4, 64),
]


@pytest.mark.parametrize("path", [gated_delta_recurrent, gated_delta_chunked, gated_delta_update],
                         ids=["recurrent", "chunked", "entry"])
@pytest.mark.parametrize("B,T,Hk,Hv,D", GRID)
@pytest.mark.parametrize("variant", ["random-state", "zero-state", "padded"])
def test_scan_matches_float64_recurrence(path, B, T, Hk, Hv, D, variant):
    inputs = random_inputs(B, T, Hk, Hv, D, seed=T + D, zero_state=variant == "zero-state",
                           padded=variant == "padded")
    expected_y, expected_state = numpy_recurrence(*inputs)
    y, state = path(*map(to_mx, inputs))
    assert y.shape == expected_y.shape and state.shape == expected_state.shape
    assert state.dtype == mx.float32
    assert rel(y, expected_y) <= 1e-5
    assert rel(state, expected_state) <= 1e-5


def test_chunked_then_recurrent_equals_recurrent_state():
    """Prefill by chunks then decode by steps ends in the same state as steps all the way."""
    q, k, v, g, beta, state, _ = random_inputs(2, 130, 2, 4, 64, seed=1)
    args = [to_mx(x) for x in (q, k, v, g, beta)]
    _, chunk_state = gated_delta_chunked(*[a[:, :120] for a in args], to_mx(state))
    _, chunk_state = gated_delta_recurrent(*[a[:, 120:] for a in args], chunk_state)
    _, step_state = gated_delta_recurrent(*args, to_mx(state))
    assert rel(chunk_state, np.array(step_state)) <= 1e-5


def test_chunked_gradient_stays_finite_where_the_decay_underflows():
    """Strong decay (exp(-exp(A) softplus(a)) below float32's range, as training reaches) gives g = 0 exactly; the
    gradient must still be finite and match the recurrent path's."""
    rng = np.random.default_rng(3)
    q, k, v, _, beta, _, _ = random_inputs(1, 70, 2, 2, 16, seed=3)
    a = mx.array(rng.normal(size=(1, 70, 2)).astype(np.float32) * 60)
    args = [to_mx(x) for x in (q, k, v)]

    def loss(path, a):
        g = mx.exp(-mx.exp(mx.array(2.7)) * mx.logaddexp(a, 0.0))
        return path(*args, g, to_mx(beta))[0].sum()

    assert (np.array(mx.exp(-mx.exp(mx.array(2.7)) * mx.logaddexp(a, 0.0))) == 0).any()
    chunked = np.array(mx.grad(lambda a: loss(gated_delta_chunked, a))(a))
    recurrent = np.array(mx.grad(lambda a: loss(gated_delta_recurrent, a))(a))
    assert np.isfinite(chunked).all()
    assert rel(chunked, recurrent) <= 1e-4


def test_chunked_gradient_matches_the_recurrence_across_segments():
    """Training differentiates the chunked path: over several segments of chunks, with grouped key heads and
    padding, its gradients must equal those of the per-step recurrence (whose values the grid checks)."""
    q, k, v, g, beta, state, mask = random_inputs(2, 600, 2, 4, 32, seed=5, padded=True)
    args = [to_mx(x) for x in (q, k, v, g, beta, state)]
    weights = mx.array(np.random.default_rng(6).standard_normal(v.shape).astype(np.float32))

    def grads(path):
        def loss(*a):
            y, final = path(*a, mask=to_mx(mask))
            return (y * weights).sum() + final.sum()
        return mx.grad(loss, argnums=tuple(range(6)))(*args)

    for name, chunked, recurrent in zip("q k v g beta state".split(), grads(
            lambda *a, mask: gated_delta_chunked(*a, mask=mask, segment=3)), grads(gated_delta_recurrent)):
        assert rel(chunked, np.array(recurrent)) <= 1e-4, name


def test_unit_lower_inverse_and_its_gradient_against_numpy():
    inverse_fn = unit_lower_inverse
    rng = np.random.default_rng(0)
    A = np.tril(rng.normal(size=(5, 64, 64)), -1) * 0.05
    expected = np.linalg.inv(np.eye(64) + A)
    np.testing.assert_allclose(np.array(inverse_fn(mx.array(A.astype(np.float32)))), expected, atol=1e-5)
    # d/dA sum(W * (I + A)^-1) = -(M^T W M^T), restricted to the strict lower triangle.
    weights = rng.normal(size=(64, 64))
    grad = mx.grad(lambda a: (inverse_fn(a) * mx.array(weights.astype(np.float32))).sum())(
        mx.array(A.astype(np.float32)))
    expected_grad = np.tril(-(expected.swapaxes(-1, -2) @ weights @ expected.swapaxes(-1, -2)), -1)
    np.testing.assert_allclose(np.tril(np.array(grad), -1), expected_grad, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(q=(1, 4, 2)), "ranks"),
    (dict(v=(1, 4, 3, 16)), "multiple of key heads"),
    (dict(g=(1, 4, 2)), "g must be"),
    (dict(state=(1, 4, 16, 8)), "state must be"),
    (dict(mask=(1, 5)), "mask must be"),
])
def test_bad_inputs_are_rejected(bad, message):
    shapes = dict(q=(1, 4, 2, 16), k=(1, 4, 2, 16), v=(1, 4, 4, 16), g=(1, 4, 4), beta=(1, 4, 4),
                  state=(1, 4, 16, 16), mask=(1, 4))
    shapes.update(bad)
    arrays = {name: mx.zeros(shape) for name, shape in shapes.items()}
    arrays["mask"] = arrays["mask"].astype(mx.bool_)
    with pytest.raises(ValueError, match=message):
        kernels.gated_delta_update(**arrays)
