"""Loading real Hugging Face directories: the text-only variant, idempotent sanitize, lazy reads, kept
extra tensors, and clear errors that change nothing on bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mlx_qwen35
from hf_reference import build_hf_model, relative_error, save_hf_checkpoint
from mlx_qwen35.config import ConfigError, ModelConfig
from mlx_qwen35.loading import CheckpointError, read_weights, sanitize


@pytest.fixture(scope="module")
def moe_model():
    return build_hf_model(moe=True, seed=11)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    hf = build_hf_model(seed=5)
    return hf, save_hf_checkpoint(hf, tmp_path_factory.mktemp("dense"))


def fresh_copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_text_only_checkpoint_matches_reference(dense_checkpoint, tmp_path):
    from transformers import Qwen3_5ForCausalLM

    hf, _ = dense_checkpoint
    text = Qwen3_5ForCausalLM(hf.config.text_config).eval()
    text.model.load_state_dict(hf.model.language_model.state_dict())
    text.lm_head.load_state_dict(hf.lm_head.state_dict())
    text.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_5_text"
    model, _ = mlx_qwen35.load(tmp_path)
    ids = np.random.default_rng(0).integers(0, 512, size=(1, 70))
    with torch.no_grad():
        expected = text.double()(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert relative_error(np.array(model(mx.array(ids))), expected) <= 1e-5


def test_sanitize_is_idempotent_and_layouts_agree(moe_model, tmp_path):
    fused = save_hf_checkpoint(moe_model, tmp_path / "fused")
    per_expert = save_hf_checkpoint(moe_model, tmp_path / "per_expert", "per_expert")
    config = ModelConfig.from_path(fused)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in read_weights(fused))
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in read_weights(per_expert))
    once = sanitize(read_weights(fused), config)
    twice = sanitize(dict(once), config)
    from_per_expert = sanitize(read_weights(per_expert), config)
    assert once.keys() == twice.keys() == from_per_expert.keys()
    assert not any(".experts.0." in k for k in from_per_expert)
    for key in once:
        np.testing.assert_array_equal(np.array(once[key]), np.array(twice[key]))
        np.testing.assert_array_equal(np.array(once[key]), np.array(from_per_expert[key]))


def test_extra_tensors_are_kept_and_never_read(dense_checkpoint, tmp_path):
    """mtp.* and model.visual.* stay available; an unused 64 MiB tensor is not read by load or forward."""
    _, source = dense_checkpoint
    path = fresh_copy(source, tmp_path)
    big = np.ones((4096, 4096), dtype=np.float32)
    save_file({"mtp.fc.weight": np.ones((64, 128), np.float32), "mtp.layers.0.mlp.up_proj.weight": big},
              str(path / "mtp.safetensors"))
    mx.clear_cache()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()  # arrays other tests' fixtures still hold
    model, _ = mlx_qwen35.load(path)
    mx.eval(model(mx.array([[1, 2, 3]])))
    growth = mx.get_peak_memory() - baseline
    assert growth < big.nbytes / 4, f"peak grew by {growth} bytes: the 64 MiB mtp tensor was read"
    extras = model.extra_weights
    assert extras["mtp.layers.0.mlp.up_proj.weight"].shape == (4096, 4096)
    assert not any(k.startswith("model.visual.") for k in extras)  # the vision tower loads as a module
    assert hasattr(model.model, "visual")


def test_missing_shard_is_named(moe_model, tmp_path):
    path = save_hf_checkpoint(moe_model, tmp_path, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        mlx_qwen35.load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_is_named(dense_checkpoint, tmp_path, damage):
    path = fresh_copy(dense_checkpoint[1], tmp_path)
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mlx_qwen35.load(path)
    assert sorted(p.name for p in path.iterdir()) == before


def test_other_architecture_is_refused(dense_checkpoint, tmp_path):
    path = fresh_copy(dense_checkpoint[1], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'llama'"):
        mlx_qwen35.load(path)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensors_are_named(dense_checkpoint, tmp_path, change):
    path = fresh_copy(dense_checkpoint[1], tmp_path)
    tensors = load_file(path / "model.safetensors")
    if change == "missing":
        name = "model.language_model.layers.2.linear_attn.A_log"
        del tensors[name]
    else:
        name = "model.language_model.layers.1.mlp.extra_proj.weight"
        tensors[name] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        mlx_qwen35.load(path)


def test_missing_expert_is_named(moe_model, tmp_path):
    path = save_hf_checkpoint(moe_model, tmp_path, "per_expert")
    tensors = load_file(next(path.glob("*.safetensors")))
    del tensors["model.language_model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(next(path.glob("*.safetensors"))))
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj"):
        mlx_qwen35.load(path)


def test_prompt_longer_than_context_is_refused_and_cache_untouched(dense_checkpoint):
    model, _ = mlx_qwen35.load(dense_checkpoint[1])
    limit = model.config.text_config.max_position_embeddings
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    states = mlx_qwen35.snapshot(cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(mx.zeros((1, limit), dtype=mx.int32), cache=cache)
    for before, layer in zip(states, cache):
        now = mlx_qwen35.snapshot([layer])[0]
        for a, b in zip(before[1:], now[1:]):
            if isinstance(a, mx.array):
                np.testing.assert_array_equal(np.array(a), np.array(b))


def test_mlx_lm_conversion_is_refused(dense_checkpoint, tmp_path):
    path = fresh_copy(dense_checkpoint[1], tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors = {k.replace("model.language_model.", "language_model.model."): v for k, v in tensors.items()}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mlx-lm"):
        mlx_qwen35.load(path)


def test_not_a_directory():
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        mlx_qwen35.load("./does/not/exist")
