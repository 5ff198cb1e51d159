"""The converter (python -m convert) on tiny random checkpoints written by transformers: float round trips in
both expert layouts, quantised conversions against the transformers float64 reference, FP8 sources, kept
vision/MTP tensors, and bad inputs that must leave nothing behind."""

import copy
import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mlx_qwen35
from convert import writer
from convert.check import check_conversion, compare_logits, fixed_prompt
from convert.convert import ConvertError, convert, main
from convert.source import E4M3FN
from hf_reference import build_hf_model, relative_error, save_hf_checkpoint
from mlx_qwen35.loading import CheckpointError

REPO = Path(__file__).resolve().parents[1]
# Quantisable sizes: every input dim (64, 128) is a multiple of group sizes 32 and 64.
DIVISIBLE = {"dense": dict(intermediate_size=128),
             "moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=64)}
# Measured 2026-11-23 on these fixtures (group 64, bfloat16, 128 tokens) against transformers in float64, as
# (relative error, mean KL nats, top-1 agreement); seed 31 is the fixture, seeds 32-33 show the spread:
#   dense bf16 only (0.035, 0.0006, 0.98)  8-bit (0.127, 0.0084, 0.81)  4-bit (0.86, 0.39, 0.11)
#         seeds 32-33: 8-bit 0.149-0.164 / 0.012-0.016 / 0.80-0.84,  4-bit 0.79-0.86 / 0.33-0.44 / 0.14-0.19
#   MoE   bf16 only (0.217, 0.024, 0.88)   8-bit (0.407, 0.088, 0.59)  4-bit (0.95, 0.48, 0.09)
#         seeds 32-33: 8-bit 0.30-0.35 / 0.045-0.062 / 0.61-0.63,    4-bit 0.97-0.99 / 0.47-0.49 / 0.08-0.13
# These random 4-layer models amplify weight error about 25-fold (8-bit's per-weight error is ~5x bf16's, and so
# is its logit error), so 4-bit saturates; the exact check of the quantised path is the dequantised-weights test.
BOUNDS = {("dense", 8): (0.2, 0.02, 0.7), ("dense", 4): (1.1, 0.6, 0.05),
          ("moe", 8): (0.55, 0.15, 0.45), ("moe", 4): (1.2, 0.7, 0.03)}


def save_checkpoint(hf, path, layout="fused", shards=1) -> Path:
    path = save_hf_checkpoint(hf, Path(path), layout, shards=shards)
    keys = source_keys(path)
    assert any(k.endswith("experts.gate_up_proj") for k in keys) == (layout == "fused" and hf.config.text_config
                                                                       .model_type.startswith("qwen3_5_moe"))
    return path


def source_keys(path) -> set:
    return {k for file in Path(path).glob("*.safetensors") for k in load_file(file)}


def reference64(hf):
    hf64 = copy.deepcopy(hf).double()
    if hasattr(hf64, "set_experts_implementation"):
        hf64.set_experts_implementation("eager")  # the grouped-mm path has no float64 kernel
    return hf64


def logits64(hf64, ids):
    with torch.no_grad():
        return hf64(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), use_cache=False).logits.numpy()


def our_logits(path, ids):
    model, _ = mlx_qwen35.load(path, dtype="float32")
    return np.array(model(mx.array(ids)))


def read_output(path) -> dict:
    """Every tensor of a converted directory as numpy (bf16 widened to float32), with its stored dtype."""
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():
            wide = value.astype(mx.float32) if value.dtype == mx.bfloat16 else value
            tensors[name] = (np.array(wide), value.dtype)
    return tensors


def checksum(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def dequantize(q, scales, biases, bits, group_size):
    """MLX affine layout, decoded in numpy: element i of a row sits in bits [i*b, (i+1)*b) of the row's uint32s."""
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    ints = (q.astype(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    ints = ints.reshape(*q.shape[:-1], -1).astype(np.float64)
    return ints * np.repeat(scales, group_size, -1).astype(np.float64) + np.repeat(biases, group_size, -1)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(5).integers(0, 512, size=(1, 128))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    hf = build_hf_model(moe=True, seed=13)
    return hf, reference64(hf), save_checkpoint(hf, tmp_path_factory.mktemp("moe-src"))


@pytest.fixture(scope="module")
def quantisable(tmp_path_factory):
    models = {}
    for kind in ("dense", "moe"):
        hf = build_hf_model(moe=kind == "moe", seed=31, **DIVISIBLE[kind])
        models[kind] = hf, reference64(hf), save_checkpoint(hf, tmp_path_factory.mktemp(f"{kind}-q"))
    return models


def test_e4m3fn_table_matches_torch():
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(E4M3FN), np.isnan(expected))
    np.testing.assert_array_equal(E4M3FN[~np.isnan(E4M3FN)], expected[~np.isnan(expected)])


@pytest.mark.parametrize("kind, layout, shards", [("moe", "fused", 1), ("moe", "per_expert", 3),
                                                   ("dense", "fused", 2)])
def test_float32_round_trip_is_identical(kind, layout, shards, tmp_path, ids):
    hf = build_hf_model(moe=kind == "moe", seed=7)
    source = save_checkpoint(hf, tmp_path / "src", layout, shards=shards)
    if kind == "moe":
        fused = "model.language_model.layers.0.mlp.experts.gate_up_proj" in source_keys(source)
        assert fused == (layout == "fused")
    before = checksum(source)
    report = convert(source, tmp_path / "out", dtype="float32", max_shard_size="150KB", progress=False)
    index = json.loads((report.output / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((report.output / f).stat().st_size < 300_000 for f in files)
    assert not any(".experts.0." in k for k in index["weight_map"])
    assert (report.output / "generation_config.json").exists()
    converted = our_logits(report.output, ids)
    np.testing.assert_array_equal(converted, our_logits(source, ids))
    assert relative_error(converted, logits64(reference64(hf), ids)) <= 1e-5
    assert checksum(source) == before


def test_side_files_are_copied_and_converting_again_changes_nothing(moe, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(moe[2], source)
    side = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ messages }}",
            "preprocessor_config.json": '{"patch_size": 16}', "video_preprocessor_config.json": "{}",
            "processor_config.json": "{}", "merges.txt": "a b", "vocab.json": "{}"}
    for name, text in side.items():
        (source / name).write_text(text)
    out = convert(source, tmp_path / "out", dtype="float32", progress=False).output
    for name, text in side.items():
        assert (out / name).read_text() == text
    (out / "tokenizer.json").unlink()  # not a real tokenizer: keep load() from trying it
    (out / "tokenizer_config.json").unlink()
    again = convert(out, tmp_path / "again", dtype="float32", progress=False).output
    first, second = read_output(out), read_output(again)
    assert first.keys() == second.keys()
    for name, (value, dtype) in first.items():
        assert second[name][1] == dtype
        np.testing.assert_array_equal(second[name][0], value)


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_conversion_stays_within_measured_bounds(quantisable, kind, bits, tmp_path, ids, capsys):
    _, hf64, source = quantisable[kind]
    assert main([str(source), str(tmp_path / "out"), "--bits", str(bits), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    result = compare_logits(our_logits(tmp_path / "out", ids), logits64(hf64, ids))
    print(f"{kind} {bits}-bit: {result}")
    max_error, max_kl, min_top1 = BOUNDS[(kind, bits)]
    assert result.relative_error <= max_error and result.kl_divergence <= max_kl, result
    assert result.top1_agreement >= min_top1, result


def test_mixed_recipe_in_written_files(quantisable, tmp_path):
    hf, _, source = quantisable["moe"]
    out = convert(source, tmp_path / "out", bits=4, group_size=64, progress=False).output
    tensors = read_output(out)
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert (config["group_size"], config["bits"], config["mode"]) == (64, 4, "affine")
    text = hf.config.text_config
    H, E, I = text.hidden_size, text.num_experts, text.moe_intermediate_size
    for i, layer_type in enumerate(text.layer_types):
        p = f"model.language_model.layers.{i}"
        for module in (f"{p}.mlp.gate", f"{p}.mlp.shared_expert_gate"):
            weight, dtype = tensors[f"{module}.weight"]
            assert dtype == mx.uint32 and weight.shape[-1] == H * 8 // 32, module
            assert tensors[f"{module}.scales"][0].shape[-1] == H // 64
            assert config[module] == {"group_size": 64, "bits": 8, "mode": "affine"}
        assert tensors[f"{p}.mlp.experts.gate_up_proj"][0].shape == (E, 2 * I, H * 4 // 32)
        assert tensors[f"{p}.mlp.experts.gate_up_proj_scales"][0].shape == (E, 2 * I, H // 64)
        assert tensors[f"{p}.mlp.experts.down_proj"][1] == mx.uint32
        assert tensors[f"{p}.mlp.shared_expert.up_proj.weight"][1] == mx.uint32
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            assert tensors[f"{p}.{name}"][1] == mx.float32
        if layer_type == "linear_attention":
            la = f"{p}.linear_attn"
            for module in (f"{la}.in_proj_a", f"{la}.in_proj_b"):
                assert tensors[f"{module}.weight"][1] == mx.bfloat16 and f"{module}.scales" not in tensors
                assert config[module] is False
            assert tensors[f"{la}.conv1d.weight"][1] == mx.bfloat16
            assert tensors[f"{la}.conv1d.weight"][0].ndim == 3
            for name in ("A_log", "dt_bias", "norm.weight"):
                assert tensors[f"{la}.{name}"][1] == mx.float32
            assert tensors[f"{la}.in_proj_qkv.weight"][1] == mx.uint32
        else:
            assert tensors[f"{p}.self_attn.q_norm.weight"][1] == mx.float32
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        assert tensors[name][1] == mx.uint32 and tensors[name][0].shape[-1] == H * 4 // 32


@pytest.mark.parametrize("kind, tie", [("moe", False), ("dense", True)])
def test_quantised_model_equals_transformers_on_dequantised_weights(kind, tie, tmp_path, ids):
    """The stored quantised weights, decoded in numpy, lie on their group's grid next to the original values, and the
    quantised model (QuantizedLinear/Embedding, gather_qmm experts) equals transformers run on them."""
    hf = build_hf_model(moe=kind == "moe", tie=tie, seed=37, **DIVISIBLE[kind])
    source = save_checkpoint(hf, tmp_path / "src")
    out = convert(source, tmp_path / "out", bits=4, group_size=32, dtype="float32", progress=False).output
    tensors = read_output(out)
    config = json.loads((out / "config.json").read_text())["quantization"]
    state = {k: v.double() for k, v in hf.state_dict().items()}
    quantised = 0
    for name, (value, dtype) in tensors.items():
        if dtype != mx.uint32:
            continue
        if name.endswith(".weight"):
            module = name.removesuffix(".weight")
            scales, biases = tensors[f"{module}.scales"][0], tensors[f"{module}.biases"][0]
        else:
            module = name.rsplit(".", 1)[0]
            scales, biases = tensors[f"{name}_scales"][0], tensors[f"{name}_biases"][0]
        settings = config.get(module, True)
        bits = settings["bits"] if isinstance(settings, dict) else config["bits"]
        weight = dequantize(value, scales, biases, bits, 32)
        original = state[name].numpy()
        # MLX makes the group's larger-magnitude edge exact, so the far edge may be up to one step off.
        steps = np.abs(weight - original) / np.repeat(np.abs(scales), 32, -1)
        assert steps.max() <= 1.001 and np.mean(steps <= 0.5001) >= 0.95, name
        state[name] = torch.from_numpy(weight)
        quantised += 1
    assert quantised >= 4 * 5 + (1 if tie else 2)
    assert ("lm_head.weight" in tensors) != tie
    if tie:  # the head shares the embedding's storage: load it the same dequantised values
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    hf64 = reference64(hf)
    hf64.load_state_dict(state)
    assert relative_error(our_logits(out, ids), logits64(hf64, ids)) <= 1e-5


def test_group_size_not_dividing_an_input_dim_leaves_that_tensor_float(moe, tmp_path, ids, capsys):
    _, hf64, source = moe  # shared expert intermediate 48: group 32 cannot split shared_expert.down_proj
    out = convert(source, tmp_path / "out", bits=8, group_size=32, progress=False).output
    notes = capsys.readouterr().out
    assert "shared_expert.down_proj unquantised: group size 32 does not divide its input dim 48" in notes
    tensors = read_output(out)
    down = "model.language_model.layers.0.mlp.shared_expert.down_proj"
    assert tensors[f"{down}.weight"][1] == mx.bfloat16 and f"{down}.scales" not in tensors
    assert tensors["model.language_model.layers.0.mlp.shared_expert.up_proj.weight"][1] == mx.uint32
    assert json.loads((out / "config.json").read_text())["quantization"][down] is False
    assert relative_error(our_logits(out, ids), logits64(hf64, ids)) <= BOUNDS[("moe", 8)][0]


def fp8_checkpoint(hf, path, block, layout):
    """The Qwen FP8 release layout: per-block e4m3 weights with float32 (experts: bf16) `weight_scale_inv`
    [ceil(out/bm), ceil(in/bn)] (fused experts: `gate_up_proj_scale_inv` [E, ...]); router, gates, in_proj_a/b,
    embeddings and head kept. Returns the directory and the dequantised weights by name."""
    save_checkpoint(hf, path, layout)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    kept = ("embed_tokens", "lm_head", "mlp.gate.", "shared_expert_gate", "in_proj_a", "in_proj_b")
    dequantised, stored = {}, {}
    bm, bn = block
    for name, w in tensors.items():
        fused_expert = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if not (name.startswith("model.language_model.") and (w.ndim == 2 and name.endswith(".weight")
                                                               or fused_expert)) or any(k in name for k in kept):
            stored[name] = w
            continue
        rows, cols = w.shape[-2:]
        grid = w.new_zeros(*w.shape[:-2], -(-rows // bm), -(-cols // bn))
        for i in range(grid.shape[-2]):
            for j in range(grid.shape[-1]):
                block_values = w[..., i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].abs()
                grid[..., i, j] = block_values.flatten(-2).max(-1).values / 448.0
        if ".experts." in name:
            grid = grid.to(torch.bfloat16)
        full = grid.float().repeat_interleave(bm, -2)[..., :rows, :].repeat_interleave(bn, -1)[..., :cols]
        q = (w / full).to(torch.float8_e4m3fn)
        stored[name], stored[f"{name}_scale_inv"] = q, grid
        dequantised[name] = q.float() * full
    # Interleaved shards put each weight_scale_inv in a different file from its weight.
    keys = sorted(stored)
    weight_map = {}
    for i in range(2):
        part = {k: stored[k].contiguous() for k in keys[i::2]}
        save_file(part, str(path / f"model-{i + 1:05d}-of-00002.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"model-{i + 1:05d}-of-00002.safetensors" for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block), "modules_to_not_convert": list(kept)}
    (path / "config.json").write_text(json.dumps(config))
    return path, dequantised


@pytest.mark.parametrize("kind, layout", [("dense", "fused"), ("moe", "per_expert"), ("moe", "fused")])
def test_fp8_source_matches_reference_of_dequantised_weights(kind, layout, tmp_path, ids):
    hf = build_hf_model(moe=kind == "moe", seed=17)
    # Blocks of 32x48 leave partial blocks at the edges of every 64- and 128-wide matrix.
    source, dequantised = fp8_checkpoint(hf, tmp_path / "fp8", (32, 48), layout)
    with pytest.raises(CheckpointError, match="FP8"):
        mlx_qwen35.load(source)
    if layout == "per_expert":
        text = hf.config.text_config
        fused = {}
        for name, value in dequantised.items():
            if ".experts." in name:
                prefix, expert, projection, _ = name.rsplit(".", 3)
                fused.setdefault(prefix, {})[(int(expert), projection)] = value
        for prefix, parts in fused.items():
            dequantised[f"{prefix}.gate_up_proj"] = torch.stack([
                torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(text.num_experts)])
            dequantised[f"{prefix}.down_proj"] = torch.stack(
                [parts[(e, "down_proj")] for e in range(text.num_experts)])
    state = hf.state_dict()
    state.update({k: v for k, v in dequantised.items() if k in state})
    assert sum(k in state for k in dequantised) >= 10
    hf64 = reference64(hf)
    hf64.load_state_dict({k: v.double() for k, v in state.items()})

    out = convert(source, tmp_path / "out", dtype="float32", progress=False).output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert relative_error(our_logits(out, ids), logits64(hf64, ids)) <= 1e-5
    assert check_conversion(source, out).relative_error <= 1e-6


def test_vision_and_mtp_tensors_survive_unquantised(tmp_path):
    hf = build_hf_model(moe=True, seed=3, **DIVISIBLE["moe"])
    source = save_checkpoint(hf, tmp_path / "src", shards=2)
    rng = np.random.default_rng(0)
    mtp = {"mtp.fc.weight": rng.standard_normal((64, 128)), "mtp.pre_fc_norm_embedding.weight": rng.standard_normal(64),
           "mtp.layers.0.mlp.experts.gate_up_proj": rng.standard_normal((8, 128, 64))}
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in mtp.items()}, str(source / "mtp.safetensors"))
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    originals = {k: v.float() for file in source.glob("model-*.safetensors")
                 for k, v in load_file(file).items() if "visual" in k}
    originals.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in mtp.items()})
    assert len(originals) > 10

    out = convert(source, tmp_path / "out", bits=4, progress=False).output
    tensors = read_output(out)
    for name, original in originals.items():
        value, dtype = tensors[name]
        base = name.removesuffix(".weight")
        assert f"{base}.scales" not in tensors and f"{base}_scales" not in tensors, name
        norm = "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight")
        assert dtype == (mx.float32 if norm else mx.bfloat16), name
        expected = original if norm else original.to(torch.bfloat16).float()
        np.testing.assert_array_equal(value, expected.numpy(), err_msg=name)
    model, _ = mlx_qwen35.load(out)
    assert set(mtp) <= set(model.extra_weights)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_shard_is_named_and_nothing_is_written(moe, tmp_path, damage):
    source = tmp_path / "src"
    shutil.copytree(moe[2], source)
    shard = next(source.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(b"\x07" * 64 + data[64:] if damage == "garbage" else data[: len(data) // 2])
    before = checksum(source)
    with pytest.raises(ConvertError, match=shard.name):
        convert(source, tmp_path / "out", bits=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert checksum(source) == before


def test_unsupported_settings_are_refused(moe, tmp_path, capsys):
    assert main([str(moe[2]), str(tmp_path / "out"), "--bits", "3"]) == 1
    assert "unsupported --bits 3" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="unsupported --group-size 48"):
        convert(moe[2], tmp_path / "out", bits=4, group_size=48)
    with pytest.raises(ConvertError, match="must not be, contain or lie inside the source"):
        convert(moe[2], moe[2] / "inside", force=True)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(moe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(moe[2], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(moe[2], out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_mid_write_leaves_no_output(moe, tmp_path, monkeypatch, existing):
    source = tmp_path / "src"
    shutil.copytree(moe[2], source)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "previous.txt").write_text("old conversion")
    before, listing = checksum(source), sorted(p.name for p in tmp_path.iterdir())
    real_write, calls = writer.write_at, []

    def write_until_full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    monkeypatch.setattr(writer, "write_at", write_until_full)
    with pytest.raises(ConvertError, match="no space left on device"):
        convert(source, out, bits=4, force=existing, progress=False)
    assert len(calls) == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert checksum(source) == before
    if existing:
        assert (out / "previous.txt").read_text() == "old conversion"


def test_unknown_and_missing_tensors_are_named(moe, tmp_path):
    hf = moe[0]
    source = save_hf_checkpoint(hf, tmp_path / "src", "per_expert")
    shard = next(source.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.language_model.layers.1.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    del tensors["model.language_model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(ConvertError) as error:
        convert(source, tmp_path / "out", progress=False)
    assert "layers.1.mlp.extra_proj.weight" in str(error.value)
    assert "layers.2.mlp.experts.5.up_proj.weight" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_hub_id_that_cannot_be_fetched_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConvertError, match="cannot be fetched from the Hugging Face hub"):
        convert("no-such-org/no-such-qwen", tmp_path / "out")


def test_check_metrics_agree_with_torch():
    rng = np.random.default_rng(0)
    source, converted = rng.standard_normal((3, 7, 50)) * 3, rng.standard_normal((3, 7, 50)) * 3
    result = compare_logits(converted, source)
    s, c = torch.from_numpy(source).reshape(-1, 50), torch.from_numpy(converted).reshape(-1, 50)
    kl = torch.nn.functional.kl_div(c.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="batchmean")
    assert result.kl_divergence == pytest.approx(kl.item(), rel=1e-12)
    assert result.relative_error == pytest.approx(((c - s).norm() / s.norm()).item(), rel=1e-12)
    assert result.top1_agreement == pytest.approx((c.argmax(-1) == s.argmax(-1)).double().mean().item())
    assert result.positions == 21


def test_check_option_reports_error_against_source(quantisable, tmp_path, capsys):
    _, hf64, source = quantisable["dense"]
    assert main([str(source), str(tmp_path / "out"), "--bits", "8", "--check", "--quiet"]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"check: float32 logits over 64 positions: relative error (\S+), KL (\S+) nats, "
                      r"top-1 agreement (\S+)%", printed)
    assert match, printed
    prompt = fixed_prompt(512)
    expected = compare_logits(our_logits(tmp_path / "out", prompt), logits64(hf64, prompt))
    assert float(match.group(1)) == pytest.approx(expected.relative_error, rel=2e-3)
    assert float(match.group(2)) == pytest.approx(expected.kl_divergence, rel=2e-3)
    assert float(match.group(3)) == pytest.approx(100 * expected.top1_agreement, abs=0.06)


def test_python_m_convert_runs(moe, tmp_path, ids):
    run = subprocess.run([sys.executable, "-m", "convert", str(moe[2]), str(tmp_path / "out"), "--bits", "4",
                          "--group-size", "32", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "4-bit (group 32)" in run.stdout
    assert np.isfinite(our_logits(tmp_path / "out", ids)).all()
