"""Tiny random Qwen 3.5 checkpoints built with transformers (the reference implementation), saved as
Hugging Face directories, and the reference logits they produce."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

BASE_TEXT = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, intermediate_size=96, max_position_embeddings=4096, rms_norm_eps=1e-6,
    linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                         mrope_section=[2, 1, 1], mrope_interleaved=True),
)
MOE_TEXT = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)


def build_hf_model(moe=False, tie=False, seed=0, **text_overrides):
    """A randomly initialised transformers Qwen3_5(Moe)ForConditionalGeneration in float32, with every
    parameter (1-D ones included) drawn at random so that no zero-initialised offset can hide a bug."""
    from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                              Qwen3_5MoeForConditionalGeneration)

    text = {**BASE_TEXT, **(MOE_TEXT if moe else {}), **text_overrides}
    if moe:
        text.pop("intermediate_size", None)
        config_cls, model_cls = Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
    else:
        config_cls, model_cls = Qwen3_5Config, Qwen3_5ForConditionalGeneration
    config = config_cls(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty_like(param).uniform_(-1.0, 1.0, generator=generator))
            elif name.endswith("dt_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif param.ndim == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2
                            + (1.0 if name.endswith("linear_attn.norm.weight") else 0.0))
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 / fan_in**0.5))
    return model


def save_hf_checkpoint(model, path: Path, expert_layout="fused", shards=1) -> Path:
    """save_pretrained for config.json, then the weights written in the requested MoE expert layout: the
    runtime (fused 3-D, as Qwen's BF16 releases) or split per expert. transformers 5.23's own
    save_pretrained writes experts per expert, so its weight files are replaced. One shard is written as
    a plain model.safetensors; several get an index."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    for file in [*path.glob("*.safetensors"), *path.glob("*.index.json")]:
        file.unlink()
    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if expert_layout == "per_expert":
        tensors = split_experts(tensors)
    elif expert_layout != "fused":
        raise ValueError(f"unknown expert layout {expert_layout!r}")
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        write_shards(tensors, path, shards)
    return path


def split_experts(tensors: dict) -> dict:
    out = {}
    for key, value in tensors.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            intermediate = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = np.ascontiguousarray(value[e, :intermediate])
                out[f"{prefix}.{e}.up_proj.weight"] = np.ascontiguousarray(value[e, intermediate:])
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = np.ascontiguousarray(value[e])
        else:
            out[key] = value
    return out


def write_shards(tensors: dict, path: Path, shards: int):
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(input_ids, dtype=np.int64)), use_cache=False)
    return out.logits.float().numpy()


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
