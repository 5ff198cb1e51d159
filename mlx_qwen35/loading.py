"""From a checkpoint directory to a ready model: find and validate the safetensors files, read them lazily,
map keys with the one idempotent `sanitize`, check names and shapes strictly, and cast."""

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import platform
from .config import ModelConfig
from .models.mtp import mtp_num_layers
from .models.qwen35 import Model

EXTRA_PREFIXES = ("model.visual.", "mtp.")
PER_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Parameters kept in float32 whatever the model dtype: the norms, and the DeltaNet decay parameters.
FLOAT32_SUFFIXES = ("layernorm.weight", "norm.weight", "norm_embedding.weight", "norm_hidden.weight", "A_log",
                    "dt_bias")

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "default_model"


class CheckpointError(ValueError):
    pass


def resolve_path(path_or_id) -> Path:
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
        return path
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]))
    except Exception as error:  # offline, unknown repo, or no access: all end the same way for the user
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {error})") from error


def safetensors_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index_file} is not a valid safetensors index: {error}") from error
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} contains no .safetensors files")
    return files


def check_safetensors_file(file: Path) -> dict:
    """Validate the header and the file length (a truncated download fails here, not mid-forward)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > size - 8:
            raise CheckpointError(f"{file} is corrupt: header length {header_len} exceeds the file size")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{file} is corrupt: unreadable header ({error})") from error
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file} is truncated: {size} bytes on disk, {8 + header_len + end} expected from its header")
    return header


def read_weights(path: Path) -> dict:
    """Every tensor of the checkpoint as a lazy MLX array: nothing is read until it is used."""
    weights = {}
    for file in safetensors_files(path):
        check_safetensors_file(file)
        try:
            weights.update(mx.load(str(file)))
        except Exception as error:
            raise CheckpointError(f"{file} could not be read: {error}") from error
    return weights


def sanitize(weights: dict, config: ModelConfig) -> dict:
    """Map any supported key layout to the model's names. Idempotent: sanitize(sanitize(w)) == sanitize(w).

    - `*_text` checkpoints (`model.layers...`) move under `model.language_model.`;
    - per-expert MoE tensors `experts.{e}.{gate,up,down}_proj.weight` are stacked into the fused
      `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I];
    - a tied `lm_head.weight` is dropped.
    Norm offsets and the conv layout stay as in the checkpoint: the model reads them as stored.
    """
    renamed = {}
    for key, value in weights.items():
        key = sanitize_key(key, config)
        if key is not None:
            renamed[key] = value
    return stack_per_expert_weights(renamed, config)


def sanitize_key(key: str, config: ModelConfig) -> str | None:
    """The model's name for one checkpoint key, or None for a key to drop (the converter maps keys one
    tensor at a time with this; per-expert keys keep their names and are stacked afterwards)."""
    if key.startswith("language_model.model."):
        raise CheckpointError("these weights are an mlx-lm conversion (norms shifted by +1, conv transposed); "
                              "load the original Hugging Face checkpoint instead")
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        key = "model.language_model." + key.removeprefix("model.")
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return None
    return key


def stack_per_expert_weights(weights: dict, config: ModelConfig) -> dict:
    groups = {}
    for key in list(weights):
        match = PER_EXPERT_KEY.match(key)
        if match:
            prefix, expert, projection = match.groups()
            groups.setdefault(prefix, {})[(int(expert), projection)] = weights.pop(key)
    num_experts = config.text_config.num_experts
    for prefix, tensors in groups.items():
        missing = [f"{prefix}.{e}.{p}_proj.weight" for e in range(num_experts) for p in ("gate", "up", "down")
                   if (e, f"{p}_proj") not in tensors]
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} expert tensors, e.g. {', '.join(missing[:4])}")
        weights[f"{prefix}.gate_up_proj"] = mx.stack([
            mx.concatenate([tensors[(e, "gate_proj")], tensors[(e, "up_proj")]], axis=0)
            for e in range(num_experts)])
        weights[f"{prefix}.down_proj"] = mx.stack([tensors[(e, "down_proj")] for e in range(num_experts)])
    return weights


def _listed(names, limit=8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def unbuilt_prefixes(model: Model) -> tuple:
    """The EXTRA_PREFIXES the model has no parameters under: those tensors are kept raw in extra_weights.
    A part the model builds (the vision tower, when the config has one) loads strictly like the rest."""
    names = [k for k, _ in tree_flatten(model.parameters())]
    return tuple(p for p in EXTRA_PREFIXES if not any(k.startswith(p) for k in names))


def load_model(path, dtype=None, expert_cache_gb=None) -> Model:
    """With `expert_cache_gb`, routed experts are not loaded: they are read on demand into a cache of that
    many GB (see mlx_qwen35.experts), from CHECKPOINT/expert_store when present, else from the safetensors."""
    path = resolve_path(path)
    config = ModelConfig.from_path(path)
    if is_fp8_checkpoint(config):
        raise CheckpointError(f"{path} holds FP8 weights with block scales; convert it first "
                              f"(python -m convert {path} OUTPUT [--bits 4])")
    weights = sanitize(read_weights(path), config)
    dtype = platform.parse_dtype(dtype) or platform.default_dtype()

    # The MTP head is built only when the config asks for it and the checkpoint has its tensors, so a
    # checkpoint whose mtp.* was stripped still loads strictly (and without it, mtp.* stays raw).
    has_mtp = any(k.startswith("mtp.") for k in weights)
    model = Model(config, mtp_layers=mtp_num_layers(config.raw) if has_mtp else 0)
    if config.raw.get("quantization"):
        quantize_model(model, config.raw["quantization"], weights)
    expected = dict(tree_flatten(model.parameters()))
    extras = {k: v for k, v in weights.items() if k.startswith(unbuilt_prefixes(model))}
    used = {k: v for k, v in weights.items() if k not in extras}
    missing, unexpected = expected.keys() - used.keys(), used.keys() - expected.keys()
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} tensors: {_listed(unexpected)}")
        raise CheckpointError(f"{path} does not match its config ({config.model_type}): " + "; ".join(problems))
    wrong_shapes = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
                    for k, v in used.items() if v.shape != expected[k].shape]
    if wrong_shapes:
        raise CheckpointError(f"{path}: tensors with wrong shapes: {_listed(wrong_shapes)}")

    if expert_cache_gb is not None:
        from .experts import attach_expert_cache

        used = attach_expert_cache(model, path, used, expert_cache_gb, dtype)
    model.load_weights([(k, cast(k, v, dtype)) for k, v in used.items()], strict=True)
    try:
        mx.eval(model.parameters())
    except Exception as error:
        raise CheckpointError(f"{path}: reading tensors failed: {error}") from error
    model._extra_weights.update(extras)
    model.eval()
    return model


def is_fp8_checkpoint(config: ModelConfig) -> bool:
    return (config.raw.get("quantization_config") or {}).get("quant_method") == "fp8"


def quantize_model(model: Model, quantization: dict, weights: dict):
    """Swap in MLX affine-quantised layers where the checkpoint holds quantised tensors.

    `quantization` is config.json's mlx-lm style entry: {"group_size": g, "bits": b, "mode": "affine"} plus
    optional per-module entries keyed by module path, each {"group_size": ..., "bits": ...} or false. A module
    is quantised only when the checkpoint has its scales (`X.scales`, or `X.gate_up_proj_scales` for the
    stacked experts), so a tensor the converter left in float loads as float.
    """
    defaults = {"group_size": quantization.get("group_size", 64), "bits": quantization.get("bits", 4),
                "mode": quantization.get("mode", "affine")}

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if f"{path}.scales" not in weights and f"{path}.gate_up_proj_scales" not in weights:
            return False
        override = quantization.get(path, True)
        if isinstance(override, dict):
            return {**defaults, **{k: v for k, v in override.items() if k in defaults}}
        return dict(defaults) if override else False

    nn.quantize(model, class_predicate=predicate)


def cast(key: str, value, dtype):
    if not mx.issubdtype(value.dtype, mx.floating):
        return value
    if key.endswith(FLOAT32_SUFFIXES):
        return value.astype(mx.float32)
    return value.astype(dtype)


def load_processor(path):
    """The tokenizer (mlx-lm's wrapper) when the checkpoint has tokenizer files, else None; wrapped in the
    image / video Processor (which still answers every tokenizer call) when the config has a vision tower."""
    path = resolve_path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    if ModelConfig.from_path(path).vision_config is None:
        return tokenizer
    from .processing.processor import Processor

    return Processor.from_path(path, tokenizer)


def default_model_path() -> Path:
    """The small Qwen 3.5 trained on the synthetic world that ships inside the package (docs/default-model.md)."""
    if not (DEFAULT_MODEL_PATH / "model.safetensors").is_file():
        raise FileNotFoundError(f"the default model is missing from {DEFAULT_MODEL_PATH}: reinstall mlx-qwen35 or "
                                f"rebuild it with `mlx-qwen35 train-default`")
    return DEFAULT_MODEL_PATH


def load(path=None, dtype=None, expert_cache_gb=None, adapter=None):
    """Load a Qwen 3.5 checkpoint directory (Hugging Face or converted); without a path, the shipped default
    model. Returns (model, processor). `expert_cache_gb` streams the routed experts through a cache of that size
    instead of loading them; `adapter` is a LoRA adapter directory written by `mlx-qwen35 train --lora`."""
    path = default_model_path() if path is None else path
    model = load_model(path, dtype, expert_cache_gb)
    if adapter:
        from .train.lora import load_adapter

        load_adapter(model, adapter)
    return model, load_processor(path)
