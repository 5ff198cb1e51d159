"""The expert-cache scale benchmark's parts, at toy size: the synthetic checkpoint's two views (our store and
mlx-vlm's safetensors) hold the same bytes, every engine decodes the same logits from a trace, the LRU engine
agrees with the offline simulator, and the traces have the properties the controls rely on."""

import argparse

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen35.experts import ExpertStore, simulate, traces
from mlx_qwen35.experts.bench_engines import TraceLookahead, TraceRouter, attach_engine, load_resident, make_trace
from mlx_qwen35.experts.synthetic import write_synthetic_checkpoint

LAYERS, EXPERTS, TOP_K, HIDDEN, INTER = 2, 16, 4, 256, 128


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic")
    info = write_synthetic_checkpoint(path, layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, hidden=HIDDEN,
                                      moe_intermediate=INTER, log=None)
    return path, info


def test_store_and_peer_safetensors_are_the_same_bytes(synthetic):
    path, info = synthetic
    store = ExpertStore(path / "expert_store")  # checks every record's CRC on read
    assert info["expert_bytes"] == 3 * HIDDEN * INTER // 2 + 2 * 3 * HIDDEN * INTER // 64 * 4
    for layer in range(LAYERS):
        peer = mx.load(str(path / "offload" / "experts" / f"layer_{layer:04d}.safetensors"))
        assert len(peer) == EXPERTS * 9
        records = []
        for expert in range(EXPERTS):
            ours = store.read(layer, expert)
            records.append(ours["gate_up_proj"].tobytes())
            for kind, suffix in (("weight", ""), ("scales", "_scales"), ("biases", "_biases")):
                gate_up = ours[f"gate_up_proj{suffix}"]
                assert np.array_equal(np.array(peer[f"e{expert}.gate_proj.{kind}"]), gate_up[:INTER])
                assert np.array_equal(np.array(peer[f"e{expert}.up_proj.{kind}"]), gate_up[INTER:])
                assert np.array_equal(np.array(peer[f"e{expert}.down_proj.{kind}"]), ours[f"down_proj{suffix}"])
        assert len(set(records)) == EXPERTS  # distinct codes per expert
    # Dequantised weights have variance ~1/fan_in, so activations stay finite through the layers.
    ours = store.read(0, 3)
    for name, fan_in in (("gate_up_proj", HIDDEN), ("down_proj", INTER)):
        w = mx.dequantize(mx.array(ours[name]), mx.array(ours[f"{name}_scales"]), mx.array(ours[f"{name}_biases"]),
                          group_size=64, bits=4)
        assert 0.7 < np.var(np.array(w)) * fan_in < 1.5
    store.close()


def decode(path, engine, trace, budget_gb, tokens=6):
    model, weights = load_resident(path)
    router = TraceRouter(trace)
    options = argparse.Namespace(io_threads=2, lookahead_precision=0.5)
    handle = attach_engine(model, engine, path, budget_gb, router, options)
    model.load_weights(list(weights.items()), strict=True)
    cache, token, out = model.make_cache(), 0, []
    for _ in range(tokens):
        logits = model(mx.array([[token]]), cache=cache)
        out.append(np.array(logits[0, -1]))
        token = int(np.argmax(out[-1]))
    return np.stack(out), handle


def test_engines_decode_the_same_logits(synthetic):
    path, info = synthetic
    trace = make_trace("realistic", 6, LAYERS, EXPERTS, TOP_K, seed=3)
    budget = 6 * info["expert_bytes"] / 1e9  # 6 of 32 experts: evictions on every path
    reference, cache = decode(path, "ours-noprefetch", trace, budget)
    assert np.isfinite(reference).all() and cache.summary()["overall"]["evictions"] > 0
    for engine in ("ours", "lru", "mmap"):
        logits, _ = decode(path, engine, trace, budget)
        assert np.array_equal(logits, reference), engine


def test_mlx_vlm_engine_decodes_the_same_logits(synthetic):
    pytest.importorskip("mlx_vlm", reason="the peer comparison needs mlx-vlm: pip install -e '.[peers]'")
    path, info = synthetic
    trace = make_trace("realistic", 6, LAYERS, EXPERTS, TOP_K, seed=3)
    budget = 6 * info["expert_bytes"] / 1e9
    reference, _ = decode(path, "ours-noprefetch", trace, budget)
    logits, store = decode(path, "mlx-vlm", trace, budget)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
    assert store.stats()["evictions"] > 0


def test_lru_engine_agrees_with_the_simulator(synthetic):
    path, info = synthetic
    trace = make_trace("realistic", 12, LAYERS, EXPERTS, TOP_K, seed=4)
    _, cache = decode(path, "lru", trace, 8 * info["expert_bytes"] / 1e9, tokens=12)
    measured = cache.summary()["overall"]["hit_rate"]
    assert abs(measured - simulate("lru", traces.as_calls(trace), 8)) < 0.03
    assert 0.0 < measured < 1.0


def test_lookahead_names_the_requested_share_of_the_next_experts():
    trace = make_trace("realistic", 5, 3, 64, 10)
    router = TraceRouter(trace)
    router.position[2] = 3
    logits = np.array(TraceLookahead(router, 2, 0.7, 64, seed=0)(mx.zeros((1, 8))))
    predicted = np.nonzero(logits[0])[0]
    assert len(predicted) == 10 and len(np.intersect1d(predicted, trace[3, 2])) == 7


def test_controls_keep_popularity_and_remove_reuse():
    real = traces.realistic_trace(400, 4, 128, 10, seed=1)
    shuffled = traces.shuffled(real, seed=2)
    uniform = traces.uniform_trace(400, 4, 128, 10, seed=1)
    for trace in (real, shuffled, uniform):
        assert all(len(np.unique(row)) == 10 for row in trace.reshape(-1, 10))
    for layer in range(4):
        assert np.array_equal(np.sort(real[:, layer].ravel()), np.sort(shuffled[:, layer].ravel()))
    # Uniform i.i.d. routing reuses K/E of the previous token's experts; a shuffle falls to popularity alone.
    assert abs(traces.reuse(uniform) - 10 / 128) < 0.02
    assert traces.reuse(real) > traces.reuse(shuffled) + 0.1
    # Caches cannot beat chance on uniform routing: hit rate ~ capacity share for any policy.
    calls = traces.as_calls(uniform)
    # (LRU lands a little below the 25% capacity share: the layer being called holds the oldest entries.)
    for policy in ("lru", "lrfu", "lrfu-adaptive"):
        assert 0.18 < simulate(policy, calls, 128) < 0.27


def test_realistic_trace_matches_the_published_397b_statistics():
    k4 = traces.realistic_trace(200, 8, 512, 4, seed=0)
    assert np.array_equal(k4, traces.realistic_trace(200, 8, 512, 10, seed=0)[..., :4])  # same scores, ranked
    # 27-29.5% of experts reused at t+1; per-layer LRU hit 49/59/68/71% at 16/32/64/128 entries (flash-moe).
    assert 0.22 < traces.reuse(k4) < 0.35
    for entries, published in traces.PUBLISHED_LRU_397B_K4.items():
        assert abs(traces.per_layer_lru(k4, entries) - published) < 0.1


def test_record_routing_gives_each_tokens_experts_and_the_next_layer_routers_precision():
    """record_routing against a float64 NumPy router: the trace holds each token's top-K experts per MoE layer
    in order, and the precision is the share of layer l+1's experts that its router picks from layer l's
    input."""
    from types import SimpleNamespace

    from mlx_qwen35.config import TextConfig
    from mlx_qwen35.models.moe import SparseMoeBlock

    config = TextConfig(num_hidden_layers=3, vocab_size=8, num_attention_heads=1, num_key_value_heads=1,
                        hidden_size=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                        shared_expert_intermediate_size=8)
    mx.random.seed(0)
    blocks = [SparseMoeBlock(config) for _ in range(3)]
    model = SimpleNamespace(layers=[SimpleNamespace(mlp=b) for b in blocks] + [SimpleNamespace(mlp=None)])
    inputs = [mx.random.normal((5, 16)), mx.random.normal((1, 16)), mx.random.normal((3, 16))]
    seen = []

    def run():
        for x in inputs:
            for block in blocks:
                seen.append(np.array(x, dtype=np.float64))
                x = x + block(x)

    trace, precision = traces.record_routing(model, run)
    assert trace.shape == (9, 3, 2)
    gates = [np.array(b.gate.weight, dtype=np.float64) for b in blocks]
    expected = np.zeros((9, 3, 2), dtype=np.int64)
    hits = np.zeros(2)
    for call, x in enumerate(seen):
        chunk, layer = divmod(call, 3)
        rows = slice(sum(len(i) for i in inputs[:chunk]), sum(len(i) for i in inputs[:chunk + 1]))
        expected[rows, layer] = np.sort(np.argsort(-(x @ gates[layer].T), axis=1)[:, :2], axis=1)
        if layer < 2:
            predicted = np.argsort(-(x @ gates[layer + 1].T), axis=1)[:, :2]
            actual = np.argsort(-(seen[call + 1] @ gates[layer + 1].T), axis=1)[:, :2]
            hits[layer] += sum(len(np.intersect1d(p, a)) for p, a in zip(predicted, actual))
    np.testing.assert_array_equal(np.sort(trace, axis=2), expected)
    np.testing.assert_allclose(precision, hits / 18)
    assert "route" not in vars(blocks[0])  # the model is left as it was
    with pytest.raises(ValueError, match="never called"):
        traces.record_routing(model, lambda: None)


def test_plain_cpu_engine_runs_the_peer_without_our_cpu_settings(synthetic, monkeypatch):
    """`mlx-vlm-plain` is mlx-vlm's engine in a child without the sgemv forwarding and malloc settings (as the
    peer's users have their CPU); `mlx-vlm` is the same engine with them (the caches compared alone)."""
    pytest.importorskip("mlx_vlm", reason="the peer comparison needs mlx-vlm: pip install -e '.[peers]'")
    from mlx_qwen35.experts import bench_scale

    path, info = synthetic
    monkeypatch.setattr(bench_scale, "drop_caches", lambda: True)  # toy files; keep the machine's page cache
    args = argparse.Namespace(path=str(path), tokens=3, warmup=1, budget_gb=6 * info["expert_bytes"] / 1e9,
                              prewarm=2, io_threads=2, seed=0, lookahead_precision=0.5, wait_for=None)
    settings = {}
    for engine in ("mlx-vlm-plain", "mlx-vlm"):
        result = bench_scale._run_once(args, engine, "realistic", None)
        assert "failed" not in result, result.get("stderr")
        assert result["engine"] == engine and result["finite"]
        settings[engine] = result["cpu"]
    assert "sgemv: off" in settings["mlx-vlm-plain"] and "freed blocks: off" in settings["mlx-vlm-plain"]
    if "sgemv: on" not in settings["mlx-vlm"]:
        pytest.skip(f"our CPU settings are not available here: {settings['mlx-vlm']}")
    assert "freed blocks: on" in settings["mlx-vlm"]
