"""Random-weight Qwen 3.5 checkpoints in Hugging Face layout with the real 248,320-row vocabulary: the tiny
one for tests of the loading and generation path, and Qwen3.5-0.8B shapes for benchmarks. Their output is
meaningless (the trained default model is `loading.default_model_path()`)."""

import json
import shutil
from pathlib import Path

import mlx.core as mx

DEFAULT_PATH = Path.home() / ".cache" / "mlx-qwen35" / "tiny-random-qwen3_5"
TEXT_CONFIG = dict(
    model_type="qwen3_5_text", vocab_size=248320, hidden_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=384,
    max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
    linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                         mrope_section=[3, 3, 2], mrope_interleaved=True),
    eos_token_id=248046,
)


# The Qwen3.5-0.8B text shapes (shared/docs/qwen35_spec.md section 6), for benchmarks.
QWEN35_0_8B_TEXT_CONFIG = dict(
    TEXT_CONFIG, hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, intermediate_size=3584, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=16, layer_types=None, full_attention_interval=4,
    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                         mrope_section=[11, 11, 10], mrope_interleaved=True),
)


TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=None,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                   in_channels=3, hidden_act="gelu_pytorch_tanh")
# Small pixel budgets keep an image to a few dozen placeholder tokens on this tiny model.
PREPROCESSOR = {"size": {"shortest_edge": 4096, "longest_edge": 262144}, "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
VIDEO_PREPROCESSOR = dict(PREPROCESSOR, fps=2.0, min_frames=4, max_frames=16)


def build_random_checkpoint(path: Path = DEFAULT_PATH, seed: int = 0, text_config: dict = TEXT_CONFIG) -> Path:
    from mlx.utils import tree_flatten

    from .config import ModelConfig
    from .models.qwen35 import Model
    from .tokenizer import write_tokenizer_files

    path = Path(path)
    text_config = {k: v for k, v in text_config.items() if v is not None} | {"tie_word_embeddings": True}
    vision = dict(TINY_VISION, out_hidden_size=text_config["hidden_size"])
    config_dict = dict(model_type="qwen3_5", text_config=text_config, vision_config=vision, tie_word_embeddings=True,
                       eos_token_id=248046)
    model = Model(ModelConfig.from_dict(config_dict))
    mx.random.seed(seed)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        if name.endswith("A_log"):
            value = mx.random.uniform(-1.0, 1.0, param.shape)
        elif param.ndim == 1:
            value = param + 0.1 * mx.random.normal(param.shape)
        else:
            value = mx.random.normal(param.shape) * param.shape[-1] ** -0.5
        weights[name] = value.astype(mx.bfloat16)
        mx.eval(weights[name])
    # Written beside the target and renamed at the end: a directory at `path` is always complete.
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "mlx"})
    (partial / "config.json").write_text(json.dumps(config_dict, indent=2))
    (partial / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (partial / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=2))
    write_tokenizer_files(partial)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


def ensure_random_checkpoint(path: Path = DEFAULT_PATH) -> Path:
    if not (Path(path) / "preprocessor_config.json").exists():
        build_random_checkpoint(path)
    return Path(path)
