"""The expert cache on tiny MoE checkpoints: streamed experts give the fully loaded model's logits bit for bit
and its greedy tokens at every budget (float32 and 4-bit), eviction and prefetch really happen, the policy
beats LRU on skewed routing, and a bad store or a failing disk gives clear errors without breaking the cache."""

import errno
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import build_hf_model, save_hf_checkpoint
from mlx.utils import tree_flatten

import mlx_qwen35
from convert.convert import convert
from mlx_qwen35.experts import (
    ExpertReadError,
    ExpertStore,
    ExpertStoreError,
    simulate,
    write_expert_store,
)
from mlx_qwen35.experts.store import ALIGN
from mlx_qwen35.experts.store import main as store_main
from mlx_qwen35.generation.generate import generate_tokens

# Quantisable sizes (inputs 64 wide for group 64); 8 experts, top-2, 4 MoE layers.
DIMS = dict(moe_intermediate_size=64, shared_expert_intermediate_size=64)
PROMPT = [3, 17, 250, 9, 101, 44, 7, 300, 12, 88, 5]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert_cache")
    hf = build_hf_model(moe=True, seed=5, **DIMS)
    source = save_hf_checkpoint(hf, root / "hf")
    out = {}
    for name, bits in (("float32", None), ("4bit", 4)):
        path = root / name
        convert(source, path, bits=bits, dtype="float32", progress=False, log=lambda *a: None)
        write_expert_store(path)
        out[name] = path
    out["hf"] = source
    return out


def reference(path):
    model, _ = mlx_qwen35.load(path, dtype="float32")
    return np.array(model(mx.array([PROMPT]))), greedy(model)


def greedy(model) -> list:
    return [r.token for r in generate_tokens(model, PROMPT, max_tokens=NEW_TOKENS)]


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: reference(checkpoints[name]) for name in ("float32", "4bit")}


def expert_bytes(path) -> int:
    store = ExpertStore(Path(path) / "expert_store")
    layer = store.layers[0]
    nbytes = sum(int(np.prod(shape)) * 4 for _, _, shape in store.components(layer))
    store.close()
    return nbytes  # float32 and uint32 are both 4 bytes


def budget_gb(path, experts: int) -> float:
    return experts * expert_bytes(path) / 1e9


@pytest.mark.parametrize("name", ["float32", "4bit"])
@pytest.mark.parametrize("budget", ["active", "half", "all"])
def test_streamed_model_is_bit_identical(checkpoints, references, name, budget):
    path = checkpoints[name]
    experts = {"active": 2, "half": 4 * 8 // 2, "all": 4 * 8}[budget]  # top_k=2; 4 layers x 8 experts
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=budget_gb(path, experts))
    cache = model.expert_cache
    assert not [k for k, _ in tree_flatten(model.parameters()) if ".mlp.experts." in k]

    logits, tokens = references[name]
    assert np.array_equal(np.array(model(mx.array([PROMPT]))), logits)
    assert greedy(model) == tokens
    summary = cache.summary()
    overall = summary["overall"]
    assert summary["peak_bytes"] <= cache.budget_bytes
    assert overall["misses"] > 0 and overall["read_errors"] == 0
    assert overall["bytes_read"] == overall["reads"] * expert_bytes(path)
    if budget == "all":
        assert overall["evictions"] == 0 and overall["misses"] <= 4 * 8
        assert overall["prefetch_hits"] > 0 and overall["predicted_correct"] > 0
    else:
        assert overall["evictions"] > 0
    if budget == "half":
        assert overall["prefetch_issued"] > 0 and overall["prefetch_hits"] > 0
    cache.close()


def test_bfloat16_store(checkpoints, tmp_path):
    path = tmp_path / "bf16"
    convert(checkpoints["hf"], path, dtype="bfloat16", progress=False, log=lambda *a: None)
    write_expert_store(path)
    resident, _ = mlx_qwen35.load(path, dtype="bfloat16")
    streamed, _ = mlx_qwen35.load(path, dtype="bfloat16", expert_cache_gb=4 * expert_bytes(path) / 2 / 1e9)
    ids = mx.array([PROMPT])
    assert np.array_equal(np.array(streamed(ids).astype(mx.float32)), np.array(resident(ids).astype(mx.float32)))
    assert streamed.expert_cache.summary()["overall"]["evictions"] > 0


def test_prefill_reads_each_distinct_expert_once(checkpoints):
    path = checkpoints["float32"]
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=budget_gb(path, 32))
    model(mx.array([PROMPT]))
    first = model.expert_cache.summary()["layers"][0]  # layer 0 is never prefetched into
    # 11 tokens x top-2 = 22 routed choices over 8 experts, read once per distinct expert.
    assert first["reads"] == first["misses"] <= 8 and first["hits"] == 0


def test_per_expert_hf_layout_read_from_safetensors(tmp_path):
    hf = build_hf_model(moe=True, seed=6)
    path = save_hf_checkpoint(hf, tmp_path / "hf", expert_layout="per_expert")
    resident, _ = mlx_qwen35.load(path, dtype="float32")
    streamed, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=1.0)
    ids = mx.array([PROMPT])
    assert type(streamed.expert_cache.store).__name__ == "CheckpointExpertStore"
    assert np.array_equal(np.array(streamed(ids)), np.array(resident(ids)))


def test_store_layout(checkpoints, tmp_path):
    path = checkpoints["4bit"]
    manifest = json.loads((path / "expert_store" / "manifest.json").read_text())
    for entry in manifest["layers"].values():
        names = [c["name"] for c in entry["components"]]
        assert names == ["gate_up_proj", "down_proj", "gate_up_proj_scales", "gate_up_proj_biases",
                         "down_proj_scales", "down_proj_biases"]
        assert all(o % ALIGN == 0 for o in entry["offsets"]) and entry["stride"] % ALIGN == 0
        assert (path / "expert_store" / entry["file"]).stat().st_size == 8 * entry["stride"]
    ExpertStore(path / "expert_store", checkpoint=path).verify(path)
    assert store_main([str(path), "--output", str(tmp_path / "store")]) == 0
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["layers"] == manifest["layers"]


def test_budget_below_one_layers_active_experts(checkpoints):
    path = checkpoints["float32"]
    minimum = 2 * expert_bytes(path)
    with pytest.raises(ValueError, match=f"at least {minimum} bytes"):
        mlx_qwen35.load(path, dtype="float32", expert_cache_gb=(minimum - 1) / 1e9)


def copy_checkpoint(path, tmp_path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "copy"))


def test_corrupt_record_names_layer_and_expert(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["float32"], tmp_path)
    store_dir = path / "expert_store"
    entry = json.loads((store_dir / "manifest.json").read_text())["layers"]["2"]
    with open(store_dir / entry["file"], "r+b") as f:
        f.seek(entry["offsets"][5] + 100)
        f.write(b"\xff\xfe\xfd\xfc")
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=1.0)
    with pytest.raises(ExpertReadError, match="layer 2 expert 5 .*checksum"):
        model.expert_cache.get(2, [4, 5])
    assert model.expert_cache.get(2, [4, 6])["down_proj"][0].shape == (64, 64)  # still usable


def test_missing_or_truncated_layer_file(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["float32"], tmp_path)
    (path / "expert_store" / "layer_001.experts").unlink()
    with pytest.raises(ExpertStoreError, match=r"layer 1 \(experts 0-7\) is missing"):
        mlx_qwen35.load(path, dtype="float32", expert_cache_gb=1.0)
    write_expert_store(path)
    file = path / "expert_store" / "layer_003.experts"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 100)
    with pytest.raises(ExpertStoreError, match="layer 3 experts 7-7 are cut off"):
        mlx_qwen35.load(path, dtype="float32", expert_cache_gb=1.0)


def test_store_from_another_checkpoint_is_rejected(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["float32"], tmp_path)
    other = tmp_path / "other"
    convert(save_hf_checkpoint(build_hf_model(moe=True, seed=7, **DIMS), tmp_path / "other_hf"), other,
            dtype="float32", progress=False, log=lambda *a: None)
    shutil.rmtree(path / "expert_store")
    shutil.copytree(write_expert_store(other), path / "expert_store")
    with pytest.raises(ExpertStoreError, match="layer 0's source hash differs"):
        mlx_qwen35.load(path, dtype="float32", expert_cache_gb=1.0)


def test_read_error_fails_the_call_and_the_next_call_works(checkpoints, references):
    path = checkpoints["4bit"]
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=budget_gb(path, 16))
    cache = model.expert_cache
    real_pread, calls = cache.store.pread, {"n": 0}

    def failing(fd, n, offset):
        calls["n"] += 1
        if calls["n"] >= 7:  # every read fails from the 7th on, demand reads included
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    cache.store.pread = failing
    with pytest.raises(ExpertReadError, match="Input/output error"):
        greedy(model)
    assert not cache.pinned and cache.nbytes <= cache.budget_bytes
    cache.store.pread = real_pread
    assert greedy(model) == references["4bit"][1]
    assert cache.summary()["overall"]["read_errors"] >= 1


def zipf_trace(seed, layers=4, experts=64, top_k=8, tokens=300, exponent=1.0, uniform=False):
    rng = np.random.default_rng(seed)
    trace, popularity = [], []
    for _ in range(layers):
        p = np.full(experts, 1.0) if uniform else 1.0 / np.arange(1, experts + 1) ** exponent
        popularity.append(rng.permutation(p / p.sum()))
    for _ in range(tokens):
        for layer in range(layers):
            trace.append((layer, rng.choice(experts, top_k, replace=False, p=popularity[layer])))
    return trace


def test_policy_beats_lru_on_skewed_routing():
    skewed = zipf_trace(0)
    for capacity in (64, 96):
        assert simulate("lrfu", skewed, capacity) > simulate("lru", skewed, capacity) + 0.05
    # Control: with uniform i.i.d. routing no policy can do better than chance.
    uniform = zipf_trace(0, uniform=True)
    assert abs(simulate("lrfu", uniform, 96) - simulate("lru", uniform, 96)) < 0.03


def test_adaptive_policy_follows_recency_or_frequency():
    from mlx_qwen35.experts.traces import as_calls, realistic_trace

    # Token-to-token reuse (a short-memory trace): a long LRFU half-life loses to LRU; the adaptive one does not.
    reuse = as_calls(realistic_trace(200, 4, 256, 10, skew=0.8, rho=0.6, seed=0))
    lru, fixed, adaptive = (simulate(p, reuse, 51) for p in ("lru", "lrfu", "lrfu-adaptive"))
    assert fixed < lru - 0.1 and adaptive > lru - 0.01
    # Skewed i.i.d. popularity: frequency wins, and the adaptive policy picks it up.
    skewed = zipf_trace(0)
    assert simulate("lrfu-adaptive", skewed, 64) > simulate("lru", skewed, 64) + 0.05


def test_offline_optimum_matches_the_textbook_and_bounds_every_policy():
    from mlx_qwen35.experts import simulate_optimal
    from mlx_qwen35.experts.traces import as_calls, realistic_trace

    # Silberschatz et al., Operating System Concepts, section 10.4: this reference string with 3 frames
    # costs 9 faults under the optimal replacement (12 under LRU).
    string = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    calls = [(0, [page]) for page in string]
    assert simulate_optimal(calls, 3) == (len(string) - 9) / len(string)
    assert simulate("lru", calls, 3) == (len(string) - 12) / len(string)
    for trace, capacity in [(zipf_trace(1), 64), (as_calls(realistic_trace(200, 4, 256, 10, seed=1)), 51)]:
        best = simulate_optimal(trace, capacity)
        assert all(simulate(p, trace, capacity) <= best for p in ("lru", "lrfu", "lrfu-adaptive"))
    with pytest.raises(ValueError, match="capacity 2 is below one call's 3 experts"):
        simulate_optimal([(0, [1, 2, 3])], 2)


def test_memory_pressure_shrinks_the_budget(checkpoints, references):
    path = checkpoints["4bit"]
    per = expert_bytes(path)
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=budget_gb(path, 32))  # room for all
    cache = model.expert_cache
    # MLX reports more active memory than the limit once about 6 more experts are resident.
    cache.memory_limit = mx.get_active_memory() + 6 * per
    assert greedy(model) == references["4bit"][1]
    summary = cache.summary()
    assert summary["shrinks"] > 0 and summary["overall"]["evictions"] > 0  # all 32 fit the original budget
    assert 2 * per <= cache.budget_bytes < 32 * per
    assert cache.used_bytes <= cache.budget_bytes and not cache.pinned
    cache.close()


def test_allocation_failure_shrinks_and_retries(checkpoints, references):
    path = checkpoints["4bit"]
    per = expert_bytes(path)
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=budget_gb(path, 32))
    cache = model.expert_cache
    real, calls = cache._to_mlx, {"n": 0}

    def flaky(layer, arrays):
        calls["n"] += 1
        if calls["n"] in (5, 12):  # one failure each time: the retry after shrinking succeeds
            raise RuntimeError("[malloc] Unable to allocate 3145728 bytes")
        return real(layer, arrays)

    cache._to_mlx = flaky
    assert greedy(model) == references["4bit"][1]
    assert len(cache.shrinks) == 2 and cache.budget_bytes <= 32 * per // 4 and cache.budget_bytes >= 2 * per
    assert "allocation failed" in cache.shrinks[0][2]

    # An allocation that keeps failing fails the request cleanly; the cache stays usable.
    def always_fails(layer, arrays):
        raise RuntimeError("[malloc] Unable to allocate 8 bytes")

    cache._to_mlx = always_fails
    cache.memory_limit = None
    for layer in cache.layers:
        for expert in range(8):
            if (layer, expert) in cache.entries:
                cache._evict((layer, expert))
    with pytest.raises(ExpertReadError, match="Unable to allocate"):
        cache.get(0, [1, 2])
    assert not cache.pinned and cache.budget_bytes == cache.minimum_bytes
    cache._to_mlx = real
    assert cache.get(0, [1, 2])["down_proj"][0].shape == (64, 64 * 4 // 32)
    cache.close()


def test_shrink_keeps_the_call_in_progress_and_never_goes_below_the_minimum(checkpoints):
    path = checkpoints["float32"]
    per = expert_bytes(path)
    model, _ = mlx_qwen35.load(path, dtype="float32", expert_cache_gb=budget_gb(path, 32))
    cache = model.expert_cache
    cache.get(1, [0, 1, 2, 3, 4])
    assert cache.shrink(0) == 5 * per  # the five pinned experts stay
    cache.release(1, [0, 1, 2, 3, 4])
    assert cache.shrink(0) == 2 * per == cache.minimum_bytes and cache.used_bytes <= 2 * per
    cache.close()
