"""A synthetic 4-bit MoE checkpoint at real expert shapes, for cache benchmarks larger than memory.

Quantised expert bytes are written directly (never quantised from floats): uint32 codes from a cheap RNG and
float32 scales/biases chosen so every dequantised weight has variance 1/fan_in. Layout under `path`:

- `config.json` + `model.safetensors`: the resident weights (mixers, router at 8 bits, shared expert,
  embeddings, head), random, quantised like the converter does; no routed experts.
- `expert_store/`: our store (`manifest.json` + `layer_NNN.experts`, see store.py). Each layer file is also a
  valid safetensors file whose tensors `e{j}.{gate,up,down}_proj.{weight,scales,biases}` point into the same
  records, so mlx-vlm's `moe_offload.ExpertStore` reads the very same bytes.
- `offload/`: mlx-vlm's repack layout (`offload_index.json`, `experts/layer_NNNN.safetensors` symlinks).
"""

import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np

from .store import ALIGN, FORMAT_VERSION, MANIFEST, STORE_DIR

GROUP, BITS = 64, 4


def synthetic_config(layers: int = 8, num_experts: int = 512, top_k: int = 10, hidden: int = 4096,
                     moe_intermediate: int = 1024, vocab: int = 4096) -> dict:
    """Qwen3.5-397B-A17B's expert shapes (H 4096, Im = Is = 1024, 512 experts, top-10), with small mixers
    (4 attention heads, 8 DeltaNet value heads) and vocabulary: on a CPU the benchmark should spend its
    compute on the experts it studies, not on the parts that stay resident anyway."""
    return {
        "model_type": "qwen3_5_moe_text", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 4,
        "linear_num_value_heads": 8, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "num_experts": num_experts,
        "num_experts_per_tok": top_k, "moe_intermediate_size": moe_intermediate,
        "shared_expert_intermediate_size": moe_intermediate, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "max_position_embeddings": 262144, "eos_token_id": 1,
    }


def expert_components(hidden: int, inter: int) -> list:
    """[(name, dtype, per-expert shape)] of one 4-bit expert, in the store's component order."""
    return [("gate_up_proj", "U32", (2 * inter, hidden * BITS // 32)),
            ("down_proj", "U32", (hidden, inter * BITS // 32)),
            ("gate_up_proj_scales", "F32", (2 * inter, hidden // GROUP)),
            ("gate_up_proj_biases", "F32", (2 * inter, hidden // GROUP)),
            ("down_proj_scales", "F32", (hidden, inter // GROUP)),
            ("down_proj_biases", "F32", (hidden, inter // GROUP))]


def _layout(hidden: int, inter: int) -> tuple:
    comps, offset = [], 0
    for name, dtype, shape in expert_components(hidden, inter):
        nbytes = math.prod(shape) * 4
        comps.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // 64) * 64
    record = comps[-1]["offset"] + comps[-1]["nbytes"]
    return comps, record, -(-record // ALIGN) * ALIGN


def _peer_tensors(comps: list, record_offset: int, expert: int) -> dict:
    """mlx-vlm's per-expert names for one record: gate and up are the two row halves of gate_up_proj."""
    out = {}
    for c in comps:
        start, rows = record_offset + c["offset"], c["shape"][0]
        kind = "weight" if c["name"] in ("gate_up_proj", "down_proj") else c["name"].rsplit("_", 1)[1]
        if c["name"].startswith("gate_up_proj"):
            half = c["nbytes"] // 2
            for i, projection in enumerate(("gate_proj", "up_proj")):
                out[f"e{expert}.{projection}.{kind}"] = {
                    "dtype": c["dtype"], "shape": [rows // 2, c["shape"][1]],
                    "data_offsets": [start + i * half, start + (i + 1) * half]}
        else:
            out[f"e{expert}.down_proj.{kind}"] = {"dtype": c["dtype"], "shape": c["shape"],
                                                  "data_offsets": [start, start + c["nbytes"]]}
    return out


def _scale_block(rng, rows: int, groups: int, fan_in: int) -> tuple:
    # codes are uniform on 0..15 (variance 21.25): scale * (q - 7.5) then has variance ~1/fan_in
    scale = (rng.uniform(0.5, 1.5, (rows, groups)) / math.sqrt(21.25 * fan_in)).astype(np.float32)
    return scale, (-7.5 * scale).astype(np.float32)


def write_layer_file(file: Path, num_experts: int, hidden: int, inter: int, rng) -> dict:
    """One layer's records; returns its manifest entry (offsets are absolute file offsets)."""
    comps, record_bytes, stride = _layout(hidden, inter)
    header = {"__metadata__": {"format": "mlx"}}
    for e in range(num_experts):
        header.update(_peer_tensors(comps, e * stride, e))
    text = json.dumps(header).encode()
    data_start = -(-(8 + len(text)) // ALIGN) * ALIGN
    text += b" " * (data_start - 8 - len(text))
    weight_bytes = comps[2]["offset"]  # the uint32 codes come first
    scales = {}
    for name, fan_in in (("gate_up_proj", hidden), ("down_proj", inter)):
        shape = next(c["shape"] for c in comps if c["name"] == f"{name}_scales")
        scales[name] = _scale_block(rng, shape[0], shape[1], fan_in)
    tail = bytearray(stride - weight_bytes)
    for c in comps[2:]:
        base, kind = c["name"].rsplit("_", 1)
        block = scales[base][0 if kind == "scales" else 1]
        tail[c["offset"] - weight_bytes: c["offset"] - weight_bytes + c["nbytes"]] = block.tobytes()
    # Every record gets distinct codes: a window of a 64 MiB random pool XOR a per-record random word.
    pool = np.frombuffer(rng.bytes(64 << 20), dtype=np.uint64)
    words = weight_bytes // 8
    offsets, crcs = [], []
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for e in range(num_experts):
            start = int(rng.integers(0, pool.size - words))
            codes = pool[start: start + words] ^ rng.integers(0, 2**63, dtype=np.uint64)
            record = codes.tobytes() + bytes(tail)
            crcs.append(zlib.crc32(memoryview(record)[:record_bytes]))
            offsets.append(data_start + e * stride)
            f.write(record)
    return {"file": file.name, "record_bytes": record_bytes, "stride": stride, "components": comps,
            "offsets": offsets, "crc32": crcs, "source_sha256": "synthetic", "fingerprint": "synthetic"}


def write_resident(path: Path, config: dict, seed: int) -> int:
    """Random resident weights, quantised as the converter does (4 bit; router and shared-expert gate 8 bit)."""
    import mlx.core as mx
    from mlx import nn
    from mlx.utils import tree_flatten

    from ..config import ModelConfig
    from ..models.qwen35 import Model

    model = Model(ModelConfig.from_dict(config))
    mx.random.seed(seed)
    values = []
    for name, p in tree_flatten(model.parameters()):
        if ".mlp.experts." in name:
            continue  # lazily allocated zeros, never evaluated
        if name.endswith(("A_log", "dt_bias")):
            value = mx.random.uniform(-1.0, 0.0, p.shape)
        elif p.ndim == 1:
            value = mx.ones(p.shape) if name.endswith("linear_attn.norm.weight") else 0.1 * mx.random.normal(p.shape)
        else:
            value = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
        values.append((name, value))
    model.load_weights(values, strict=False)
    quantization = {"group_size": GROUP, "bits": BITS, "mode": "affine"}

    def predicate(module_path, module):
        if ".mlp.experts" in module_path or not hasattr(module, "to_quantized"):
            return False
        bits = 8 if module_path.endswith(("mlp.gate", "mlp.shared_expert_gate")) else BITS
        if bits != BITS:
            quantization[module_path] = {"group_size": GROUP, "bits": bits}
        return {"group_size": GROUP, "bits": bits, "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)
    weights = {k: v for k, v in tree_flatten(model.parameters()) if ".mlp.experts." not in k}
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({**config, "quantization": quantization}, indent=1))
    return sum(v.nbytes for v in weights.values())


def write_synthetic_checkpoint(path, layers: int = 8, num_experts: int = 512, top_k: int = 10,
                               hidden: int = 4096, moe_intermediate: int = 1024, seed: int = 0, log=print) -> dict:
    """Write (or reuse, when its info.json matches) the synthetic checkpoint; returns its info.json dict."""
    path = Path(path)
    config = synthetic_config(layers, num_experts, top_k, hidden, moe_intermediate)
    info_file = path / "info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if info["config"] == config and info["seed"] == seed:
            return info
    path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    resident = write_resident(path, config, seed)
    store = path / STORE_DIR
    store.mkdir(exist_ok=True)
    peer = path / "offload" / "experts"
    peer.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, moe_layers = {}, list(range(layers))
    for layer in moe_layers:
        entries[str(layer)] = write_layer_file(store / f"layer_{layer:03d}.experts", num_experts, hidden,
                                               moe_intermediate, rng)
        link = peer / f"layer_{layer:04d}.safetensors"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(store / entries[str(layer)]["file"], peer), link)
        if log:
            log(f"layer {layer}: {num_experts} experts x {entries[str(layer)]['stride'] / 2**20:.2f} MiB "
                f"({time.perf_counter() - start:.0f} s)")
    manifest = {"version": FORMAT_VERSION, "alignment": ALIGN, "num_experts": num_experts,
                "checkpoint": str(path), "layers": entries}
    (store / MANIFEST).write_text(json.dumps(manifest))
    (path / "offload" / "offload_index.json").write_text(json.dumps({"layers": moe_layers,
                                                                       "num_experts": num_experts}))
    (path / "offload" / "config.json").write_text((path / "config.json").read_text())
    record = entries["0"]["record_bytes"]
    info = {"config": config, "seed": seed, "resident_bytes": resident, "expert_bytes": record,
            "experts_total_bytes": record * num_experts * layers, "write_seconds": time.perf_counter() - start}
    info_file.write_text(json.dumps(info, indent=1))
    return info
