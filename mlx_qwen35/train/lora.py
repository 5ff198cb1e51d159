"""LoRA: low-rank updates y = W x + (alpha / rank) * B A x on chosen nn.Linear (or quantised) layers, picked by
module-path pattern. Adapters are saved as `adapters.safetensors` (only the A and B matrices) beside
`adapter_config.json`, which names the base architecture so that a mismatched base is refused."""

import fnmatch
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

ADAPTER_FORMAT = "mlx-qwen35-lora"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapters.safetensors"
# Every projection of the text decoder (attention, DeltaNet, dense and shared-expert MLPs); not the router.
DEFAULT_TARGETS = ("model.language_model.layers.*.self_attn.*_proj",
                   "model.language_model.layers.*.linear_attn.in_proj_qkv",
                   "model.language_model.layers.*.linear_attn.in_proj_z",
                   "model.language_model.layers.*.linear_attn.out_proj",
                   "model.language_model.layers.*.mlp.*_proj",
                   "model.language_model.layers.*.mlp.shared_expert.*_proj")


class AdapterError(ValueError):
    pass


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Module, rank: int = 8, alpha: float = 16.0, key=None):
        super().__init__()
        out_dims, in_dims = _linear_dims(linear)
        self.linear = linear
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))  # zero: the adapted model starts equal to the base

    def __call__(self, x):
        y = self.linear(x)
        update = (x.astype(self.lora_a.dtype) @ self.lora_a) @ self.lora_b
        return y + (self.scale * update).astype(y.dtype)

    def fused(self) -> nn.Module:
        linear = self.linear
        delta = (self.scale * (self.lora_a @ self.lora_b)).T  # [out, in]
        quantized = isinstance(linear, nn.QuantizedLinear)
        weight = mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size,
                               linear.bits) if quantized else linear.weight
        out_dims, in_dims = weight.shape
        fused = nn.Linear(in_dims, out_dims, bias="bias" in linear)
        fused.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        return nn.QuantizedLinear.from_linear(fused, linear.group_size, linear.bits) if quantized else fused


def _linear_dims(linear) -> tuple[int, int]:
    if isinstance(linear, nn.QuantizedLinear):
        return linear.weight.shape[0], linear.weight.shape[1] * 32 // linear.bits
    if isinstance(linear, nn.Linear):
        return linear.weight.shape
    raise AdapterError(f"LoRA wraps nn.Linear / nn.QuantizedLinear layers, not {type(linear).__name__}")


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or path.split(".")[-1] == p for p in patterns)


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
               freeze_base: bool = True, seed: int | None = None) -> list[str]:
    """Wrap the linear layers whose module path matches a pattern of `targets` (fnmatch on the full path,
    or a bare layer name such as "q_proj"); freeze everything else. Returns the wrapped paths. With a `seed`
    the adapters start from weights that depend on it alone (else on MLX's global random state)."""
    if rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    if freeze_base:
        model.freeze()
    chosen = [(path, m) for path, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and _matches(path, targets)]
    if not chosen:
        raise AdapterError(f"no linear layer matches the LoRA targets {list(targets)}")
    keys = mx.random.split(mx.random.key(seed), len(chosen)) if seed is not None else [None] * len(chosen)
    model.update_modules(tree_unflatten([(path, LoRALinear(m, rank, alpha, key))
                                         for (path, m), key in zip(chosen, keys)]))
    return sorted(path for path, _ in chosen)


def lora_layers(model) -> dict:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def architecture(model) -> dict:
    """What an adapter must agree with: the model type and the text (and vision) shapes."""
    config = model.config
    text = config.text_config
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "num_experts", "moe_intermediate_size",
            "shared_expert_intermediate_size", "layer_types")
    arch = {"model_type": config.model_type, **{k: getattr(text, k) for k in keys}}
    if config.vision_config is not None:
        arch["vision"] = {k: config.vision_config.get(k) for k in ("depth", "hidden_size", "out_hidden_size")}
    return arch


def save_adapter(model, path) -> Path:
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {f"{p}.{name}": m[name] for p, m in layers.items() for name in ("lora_a", "lora_b")}
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights)
    first = next(iter(layers.values()))
    rank = first.lora_a.shape[1]
    config = {"format": ADAPTER_FORMAT, "rank": rank, "alpha": first.scale * rank, "targets": sorted(layers),
              "base_architecture": architecture(model)}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def load_adapter(model, path, fuse: bool = False):
    """Apply the adapter saved at `path` (a directory) to `model`, in place; with `fuse`, fold it into the
    weights. Raises AdapterError naming the file when the adapter was made for another architecture."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise AdapterError(f"{file} does not exist: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{config_file} is not valid JSON: {error}") from None
    if config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{config_file}: not an {ADAPTER_FORMAT} adapter (format={config.get('format')!r})")
    expected, found = architecture(model), config.get("base_architecture", {})
    differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if differ:
        details = ", ".join(f"{k}: adapter {found.get(k)!r} vs model {expected.get(k)!r}" for k in differ[:4])
        raise AdapterError(f"{config_file} was made for another architecture ({details})")
    wrapped = apply_lora(model, config["targets"], config["rank"], config["alpha"])
    if wrapped != sorted(config["targets"]):
        raise AdapterError(f"{config_file}: targets {sorted(set(config['targets']) - set(wrapped))} are not "
                           f"linear layers of this model")
    weights = mx.load(str(weights_file))
    expected_shapes = {k: v.shape for k, v in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))}
    bad = [f"{k} {weights[k].shape if k in weights else 'missing'} (expected {shape})"
           for k, shape in expected_shapes.items() if k not in weights or weights[k].shape != shape]
    bad += [f"{k} (unexpected)" for k in weights.keys() - expected_shapes.keys()]
    if bad:
        raise AdapterError(f"{weights_file} does not fit the model: {', '.join(bad[:4])}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return fuse_lora(model) if fuse else model


def fuse_lora(model):
    """Replace every LoRALinear by a plain (or quantised) linear layer with the update folded in."""
    layers = lora_layers(model)
    model.update_modules(tree_unflatten([(p, m.fused()) for p, m in layers.items()]))
    return model
