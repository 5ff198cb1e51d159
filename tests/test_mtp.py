"""The MTP head (spec 3) against a reference assembled from transformers' own modules in float64
(transformers has no MTP model): its decoder layer, RMSNorm and rotary embedding, fed the HF model's final
hidden states, on tiny random checkpoints with random mtp.* tensors loaded through mlx_qwen35.load."""

import copy
import json

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import mlx_qwen35
from hf_reference import build_hf_model, relative_error, save_hf_checkpoint

BOUND = 1e-5
LENGTH = 40


def randomize(module, generator):
    with torch.no_grad():
        for _, param in module.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 / param.shape[-1] ** 0.5))


def hf_modules(moe):
    if moe:
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

        return m.Qwen3_5MoeDecoderLayer, m.Qwen3_5MoeRMSNorm
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    return m.Qwen3_5DecoderLayer, m.Qwen3_5RMSNorm


class ReferenceMTP(torch.nn.Module):
    """Spec 3 forward from transformers modules: fc(concat(norm_e(embed(x_{t+1})), norm_h(h_t))) -> one
    full-attention decoder layer at the target's positions -> norm -> the main model's lm_head."""

    def __init__(self, text_config, moe):
        super().__init__()
        layer_cls, norm_cls = hf_modules(moe)
        H, eps = text_config.hidden_size, text_config.rms_norm_eps
        full = text_config.layer_types.index("full_attention")
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = norm_cls(H, eps=eps)
        self.pre_fc_norm_hidden = norm_cls(H, eps=eps)
        self.norm = norm_cls(H, eps=eps)
        self.layers = torch.nn.ModuleList([layer_cls(text_config, layer_idx=full)])

    def forward(self, hf, hidden, next_ids, positions):
        language_model = hf.model.language_model
        e = self.pre_fc_norm_embedding(language_model.embed_tokens(next_ids))
        z = self.fc(torch.cat([e, self.pre_fc_norm_hidden(hidden)], dim=-1))
        L = z.shape[1]
        mask = torch.full((L, L), float("-inf"), dtype=z.dtype).triu(1)[None, None]
        rotary = language_model.rotary_emb(z, positions)
        for layer in self.layers:
            z = layer(z, position_embeddings=rotary, attention_mask=mask, position_ids=positions[0])
        return hf.lm_head(self.norm(z))


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def checkpoint(request, tmp_path_factory):
    moe = request.param
    hf = build_hf_model(moe=moe, tie=False, seed=11 + moe)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("mtp-moe" if moe else "mtp-dense"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))

    reference = ReferenceMTP(hf.config.text_config, moe).eval().float()
    randomize(reference, torch.Generator().manual_seed(5 + moe))
    tensors = {f"mtp.{k}": v.detach().float().numpy() for k, v in reference.state_dict().items()}
    assert "mtp.layers.0.self_attn.q_norm.weight" in tensors and "mtp.fc.weight" in tensors
    save_file(tensors, str(path / "mtp.safetensors"), metadata={"format": "pt"})

    hf64, reference64 = copy.deepcopy(hf).double(), reference.double()
    if moe:
        hf64.set_experts_implementation("eager")
        for module in reference64.modules():
            if hasattr(module, "gate_up_proj") and hasattr(module, "config"):
                module.config._experts_implementation = "eager"
    return path, hf64, reference64


def expected_mtp_logits(hf64, reference64, ids):
    """Reference logits at every t < L-1 for the pair (final-normed h_t, token t+1), at positions t."""
    ids = torch.from_numpy(np.asarray(ids, np.int64))
    with torch.no_grad():
        hidden = hf64.model.language_model(input_ids=ids, use_cache=False).last_hidden_state
        B, L = ids.shape
        positions = torch.arange(L - 1)[None, None].expand(3, B, L - 1)
        return reference64(hf64, hidden[:, :-1], ids[:, 1:], positions).numpy()


def test_mtp_logits_match_transformers_modules(checkpoint):
    path, hf64, reference64 = checkpoint
    ids = np.random.default_rng(0).integers(0, 512, size=(2, LENGTH))
    expected = expected_mtp_logits(hf64, reference64, ids)

    model, _ = mlx_qwen35.load(path, dtype="float32")
    assert model.mtp is not None and len(model.mtp.layers) == 1
    assert not any(k.startswith("mtp.") for k in model.extra_weights)
    hidden = model.model.language_model(mx.array(ids))
    logits = np.array(model.mtp_logits(hidden[:, :-1], mx.array(ids[:, 1:])))
    assert logits.shape == expected.shape
    error = relative_error(logits, expected)
    assert error <= BOUND, f"relative error {error:.2e}"

    # the trainer hook: model.mtp(hidden, next_ids) -> logits
    hook = np.array(model.mtp(hidden[:, :-1], mx.array(ids[:, 1:])))
    assert relative_error(hook, expected) <= BOUND

    # incrementally, with the MTP head's own KV cache: positions continue the cache
    cache = model.make_mtp_cache()
    parts, split = [], [0, 17, 18, LENGTH - 1]
    for start, end in zip(split, split[1:]):
        parts.append(np.array(model.mtp_logits(hidden[:, start:end], mx.array(ids[:, start + 1:end + 1]),
                                               cache=cache)))
    error = relative_error(np.concatenate(parts, axis=1), expected)
    assert error <= BOUND, f"cached: relative error {error:.2e}"


def test_checkpoint_without_mtp_tensors_has_no_mtp_head(tmp_path):
    hf = build_hf_model(seed=1)
    path = save_hf_checkpoint(hf, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1  # as the released configs say
    (path / "config.json").write_text(json.dumps(config))
    model, _ = mlx_qwen35.load(path)
    assert model.mtp is None
    assert not any(k.startswith("mtp.") for k, _ in tree_flatten(model.parameters()))
    with pytest.raises(ValueError, match="no MTP head"):
        model.mtp_logits(mx.zeros((1, 1, 64)), mx.array([[1]]))
