"""Model settings read from a Hugging Face `config.json` (dense `qwen3_5`, MoE `qwen3_5_moe`, and the
`*_text` variants), as dataclasses. Unknown keys are ignored; derived values are filled in `__post_init__`."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

TEXT_MODEL_TYPES = {"qwen3_5_text", "qwen3_5_moe_text"}
MULTIMODAL_MODEL_TYPES = {"qwen3_5", "qwen3_5_moe"}
LAYER_TYPES = {"linear_attention", "full_attention"}


class ConfigError(ValueError):
    pass


def _known_fields(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list = field(default_factory=lambda: [11, 11, 10])
    mrope_interleaved: bool = True
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list | None = None
    full_attention_interval: int = 4
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "TextConfig":
        values = dict(values)
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"rope_type {rope_type!r} is not supported yet (only the default M-RoPE)")
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"):
            if key in rope and key not in values:
                values[key] = rope[key]
        missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                               "num_key_value_heads") if k not in values]
        if missing:
            raise ConfigError(f"text config lacks required keys: {', '.join(missing)}")
        return cls(**_known_fields(cls, values))

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) < self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        self.layer_types = list(self.layer_types[: self.num_hidden_layers])
        unknown = set(self.layer_types) - LAYER_TYPES
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}; expected {sorted(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen 3.5 uses silu)")
        if self.rotary_dim % 2 or sum(self.mrope_section) != self.rotary_dim // 2:
            raise ConfigError(
                f"mrope_section {self.mrope_section} must sum to rotary_dim/2 = {self.rotary_dim // 2}")
        if self.is_moe and not (self.num_experts_per_tok and self.moe_intermediate_size):
            raise ConfigError("an MoE config needs num_experts_per_tok and moe_intermediate_size")
        if not self.is_moe and not self.intermediate_size:
            raise ConfigError("a dense config needs intermediate_size")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass
class ModelConfig:
    model_type: str
    text_config: TextConfig
    vision_config: dict | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    eos_token_id: int | list | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text_config.tie_word_embeddings

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type in MULTIMODAL_MODEL_TYPES:
            if "text_config" not in raw:
                raise ConfigError(f"{source}: model_type {model_type!r} needs a text_config")
            text = dict(raw["text_config"])
            # The composite model reads the top-level flag (transformers' tie_weights looks at self.config).
            if "tie_word_embeddings" in raw:
                text["tie_word_embeddings"] = raw["tie_word_embeddings"]
            vision = raw.get("vision_config")
        elif model_type in TEXT_MODEL_TYPES:
            text, vision = raw, None
        else:
            supported = sorted(MULTIMODAL_MODEL_TYPES | TEXT_MODEL_TYPES)
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a Qwen 3.5 architecture; supported: {supported}")
        expected_moe = model_type.startswith("qwen3_5_moe")
        text_config = TextConfig.from_dict(text)
        if text_config.is_moe != expected_moe:
            raise ConfigError(f"{source}: model_type {model_type!r} disagrees with num_experts="
                              f"{text_config.num_experts}")
        return cls(model_type=model_type, text_config=text_config, vision_config=vision, raw=raw,
                   **_known_fields(cls, {k: v for k, v in raw.items()
                                         if k not in ("model_type", "text_config", "vision_config", "raw")}))

    @classmethod
    def from_path(cls, path: Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_file} is not valid JSON: {error}") from error
        return cls.from_dict(raw, source=str(config_file))
