"""The --check quality gate: the converted model against its source, both run in float32 on a fixed prompt of
token ids (no tokenizer needed). Loads one model at a time; the source needs float32 memory for all its weights."""

import math
from dataclasses import dataclass
from pathlib import Path

import mlx_qwen35  # noqa: F401  (loads the BLAS before MLX)
import mlx.core as mx
import numpy as np

from mlx_qwen35.config import ModelConfig
from mlx_qwen35.loading import is_fp8_checkpoint, load_model, resolve_path, sanitize, unbuilt_prefixes
from mlx_qwen35.models.qwen35 import Model

from .source import FP8_ACTIVATION_SUFFIXES, fp8_block_size, inventory

PROMPT_LENGTH = 64
PROMPT_SEED = 0
REGULAR_VOCAB = 248044  # Qwen 3.5's BPE ids; the rows above are special tokens and padding


@dataclass
class CheckResult:
    relative_error: float  # ||converted - source|| / ||source|| over all logits
    kl_divergence: float  # KL(source || converted) of the next-token distributions, nats, mean over positions
    top1_agreement: float  # fraction of positions whose most likely next token agrees
    positions: int

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.relative_error, self.kl_divergence, self.top1_agreement))

    def __str__(self) -> str:
        return (f"float32 logits over {self.positions} positions: relative error {self.relative_error:.3e}, "
                f"KL {self.kl_divergence:.3e} nats, top-1 agreement {100 * self.top1_agreement:.1f}%")


def compare_logits(converted, source) -> CheckResult:
    """converted, source: logits [..., V]; every position is compared."""
    converted = np.asarray(converted, np.float64).reshape(-1, np.shape(converted)[-1])
    source = np.asarray(source, np.float64).reshape(-1, np.shape(source)[-1])
    relative = float(np.linalg.norm(converted - source) / np.linalg.norm(source))
    log_p, log_q = log_softmax(source), log_softmax(converted)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top1 = float(np.mean(converted.argmax(-1) == source.argmax(-1)))
    return CheckResult(relative, kl, top1, source.shape[0])


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fixed_prompt(vocab_size: int, length: int = PROMPT_LENGTH) -> np.ndarray:
    return np.random.default_rng(PROMPT_SEED).integers(0, min(vocab_size, REGULAR_VOCAB), size=(1, length))


def check_conversion(source, converted, token_ids=None) -> CheckResult:
    """Logits of `converted` against `source` (float, or FP8 dequantised), both in float32."""
    source, converted = resolve_path(source), Path(converted)
    config = ModelConfig.from_path(source)
    ids = fixed_prompt(config.text_config.vocab_size) if token_ids is None else np.atleast_2d(token_ids)
    logits = {}
    for name, loader in (("converted", lambda: load_model(converted, dtype="float32")),
                         ("source", lambda: load_float32_source(source, config))):
        model = loader()
        logits[name] = np.array(model(mx.array(ids)))
        del model  # one model in memory at a time
        mx.clear_cache()
    return compare_logits(logits["converted"], logits["source"])


def load_float32_source(path: Path, config: ModelConfig) -> Model:
    if not is_fp8_checkpoint(config):
        return load_model(path, dtype="float32")
    tensors = inventory(path, fp8_block_size(config.raw))
    weights = sanitize({t.name: t.read().astype(mx.float32) for t in tensors
                        if not t.name.endswith(FP8_ACTIVATION_SUFFIXES)}, config)
    model = Model(config)
    raw_prefixes = unbuilt_prefixes(model)
    model.load_weights([(k, v) for k, v in weights.items() if not k.startswith(raw_prefixes)], strict=True)
    model.eval()
    return model
