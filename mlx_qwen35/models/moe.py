"""The sparse MoE block of `qwen3_5_moe`: softmax router, routed experts as stacked tensors driven by
gather_mm (gather_qmm when quantised) over expert-sorted tokens, and a sigmoid-gated shared expert."""

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..config import TextConfig
from ..kernels.activations import sigmoid, silu
from .layers import MLP


class Experts(nn.Module):
    """All routed experts of one layer, stored as in the checkpoint: gate_up_proj [E, 2I, H] (rows [0, I)
    gate, [I, 2I) up) and down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = mx.zeros((num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = mx.zeros((num_experts, hidden_size, intermediate_size))

    def project(self, rows, name: str, experts_sorted):
        return kernels.expert_matmul(rows, self[name], experts_sorted)

    def __call__(self, x, expert_indices):
        """x [N, H], expert_indices [N, K] -> per-choice outputs [N, K, H]."""
        N, K = expert_indices.shape
        flat = expert_indices.flatten()
        order = mx.argsort(flat)
        experts_sorted = flat[order]
        # Grouping rows by expert lets each gather_mm read every expert's weights once.
        rows = x[order // K][:, None, :]  # [N*K, 1, H]
        gate_up = self.project(rows, "gate_up_proj", experts_sorted)
        gate, up = mx.split(gate_up, 2, axis=-1)
        hidden = silu(gate) * up
        out = self.project(hidden, "down_proj", experts_sorted)
        return out[mx.argsort(order)].reshape(N, K, -1)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        return QuantizedExperts(self, group_size, bits, mode)


class QuantizedExperts(Experts):
    """Experts with MLX-quantised weights, still in the fused checkpoint layout: `gate_up_proj` [E, 2I, H*bits/32]
    packed along the input dim, with `gate_up_proj_scales` / `gate_up_proj_biases` [E, 2I, H/group_size]
    (and the same for down_proj); the suffixes follow transformers' `experts.gate_up_proj_scale_inv`."""

    def __init__(self, experts: Experts, group_size: int, bits: int, mode: str = "affine"):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        for name in ("gate_up_proj", "down_proj"):
            weight, scales, *biases = mx.quantize(experts[name], group_size, bits, mode=mode)
            self[name], self[f"{name}_scales"] = weight, scales
            if biases:
                self[f"{name}_biases"] = biases[0]
        self.freeze()

    def project(self, rows, name: str, experts_sorted):
        return kernels.expert_matmul(rows, self[name], experts_sorted, scales=self[f"{name}_scales"],
                                     biases=self.get(f"{name}_biases"), group_size=self.group_size,
                                     bits=self.bits, mode=self.mode)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        H = config.hidden_size
        self.gate = nn.Linear(H, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, H, config.moe_intermediate_size)
        self.shared_expert = MLP(H, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def route(self, x):
        """x [N, H] -> (expert indices [N, K], weights [N, K] summing to 1), selected in float32."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        # Expert choice is not differentiable; without stop_gradient MLX's backward pass fails on the indices.
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[:, : self.top_k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        weights = weights / weights.sum(-1, keepdims=True)
        return indices, weights.astype(x.dtype)

    def routed(self, x, indices, weights):
        """The routing-weighted sum of the chosen experts' outputs, [N, H]."""
        return (self.experts(x, indices) * weights[..., None]).sum(axis=1)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        indices, weights = self.route(x)
        routed = self.routed(x, indices, weights)
        shared = sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).reshape(shape)
