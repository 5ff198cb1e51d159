"""Supervised fine-tuning of a Qwen 3.5 model, full or LoRA: AdamW on the next-token loss over assistant
tokens, an optional MoE load-balancing loss, gradient checkpointing, fp32/bf16, validation loss, and
checkpoints (trainable weights + optimizer state + step) that resume exactly."""

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..kernels.activations import exact as exact_activations
from ..models.moe import Experts, SparseMoeBlock
from . import parallel
from .data import collate

FLOAT32_SUFFIXES = ("layernorm.weight", "norm.weight", "A_log", "dt_bias")
# How training runs the routed experts (the same sums and gradients; `trainable_router`): the model's own
# gather_mm, every expert as two matmuls (`dense_experts_forward`), or each expert's chosen rows as two
# matmuls of its own (`segmented_experts_forward`, the fastest on a CPU).
EXPERT_PATHS = ("gathered", "dense", "segmented")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    dtype: str = "float32"  # or "bfloat16": weights and activations; LoRA matrices and optimizer stay fp32
    grad_checkpoint: bool = False
    moe_aux_weight: float = 0.0  # load-balancing loss weight (Switch Transformer form)
    mtp_weight: float = 0.0  # loss on the token after next through the MTP head, when the model has one
    prompt_loss_weight: float = 0.0  # weight of the prompt's text tokens in the loss (assistant tokens: 1)
    experts: str = "gathered"  # the routed experts' path in training: one of EXPERT_PATHS
    workers: int = 1  # a step's rows in this many parts (`split_rows`), each in a process of its own (`parallel`)
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    pad_id: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)


def cast_model(model, dtype):
    """Cast floating parameters to dtype, keeping norms and DeltaNet decay parameters in float32 (as loading does)."""
    keep_float32 = FLOAT32_SUFFIXES + ("lora_a", "lora_b")
    params = [(k, v.astype(mx.float32 if k.endswith(keep_float32) else dtype))
              for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    model.update(tree_unflatten(params))


def enable_grad_checkpoint(model):
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    for layer in model.layers:
        base = type(layer)
        if getattr(base, "_checkpointed", False):
            continue

        def call(self, x, rotary, cache=None, _base=base):
            if cache is not None:
                return _base.__call__(self, x, rotary, cache)

            def inner(params, x, rotary):
                self.update(params)
                return _base.__call__(self, x, rotary)

            return mx.checkpoint(inner)(self.trainable_parameters(), x, rotary)

        layer.__class__ = type(base.__name__, (base,), {"__call__": call, "_checkpointed": True})


def dense_experts_forward(block, x, indices, weights):
    """The routed experts of `block` for x [N, H] as two plain matmuls over all E experts, each expert's
    hidden units scaled by its routing weight (0 for experts not chosen): the same sum as the gathered
    top-K path, and the same gradients (an unchosen expert's are exactly 0). With few experts (the default
    model: E/K = 4) two large matmuls cost far less on a CPU than gathers over small per-expert ones."""
    experts = block.experts
    E, two_i, H = experts.gate_up_proj.shape
    intermediate = two_i // 2
    combine = (weights[..., None] * (indices[..., None] == mx.arange(E)).astype(weights.dtype)).sum(1)  # [N, E]
    gate_up = (x @ experts.gate_up_proj.reshape(E * two_i, H).T).reshape(-1, E, two_i)
    gate, up = gate_up[..., :intermediate], gate_up[..., intermediate:]
    hidden = nn.silu(gate) * up * combine[..., None]
    down = experts.down_proj.transpose(0, 2, 1).reshape(E * intermediate, H)
    return hidden.reshape(-1, E * intermediate) @ down


def segmented_experts_forward(block, x, indices, weights):
    """The routed experts of `block` for x [N, H]: the N*K (token, expert) choices sorted by expert, and each
    expert's rows through two plain matmuls of its own. The gathered path's sum and gradients, with no work
    for unchosen experts (dense_experts_forward does 4x the expert work at E/K = 4) and none of gather_mm's
    per-row products: a training step of the default model runs about 1.2x dense's tok/s on a CPU
    (`mlx-qwen35 bench --train`). The sort is read on the host; routing is data to the backward pass."""
    experts = block.experts
    E, two_i, _ = experts.gate_up_proj.shape
    intermediate = two_i // 2
    N, K = indices.shape
    chosen = np.array(indices).reshape(-1)
    order = np.argsort(chosen, kind="stable")
    counts = np.bincount(chosen, minlength=E)
    rows = x[mx.array(order // K)]
    outputs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        gate_up = rows[start:start + count] @ experts.gate_up_proj[expert].T
        hidden = nn.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        outputs.append(hidden @ experts.down_proj[expert].T)
        start += count
    back = np.empty_like(order)
    back[order] = np.arange(N * K)
    per_choice = mx.concatenate(outputs)[mx.array(back)].reshape(N, K, -1)
    return (per_choice * weights[..., None]).sum(axis=1)


ROUTED_FORWARD = {"dense": dense_experts_forward, "segmented": segmented_experts_forward}


def check_expert_path(experts: str):
    if experts not in EXPERT_PATHS:
        raise ValueError(f"experts {experts!r}: one of {', '.join(EXPERT_PATHS)}")


@contextmanager
def trainable_router(model, records=None, experts: str = "gathered"):
    """While the context is open, append each MoE block's (router probs [N, E], chosen experts [N, K]) to
    `records` when given (for the load-balancing loss), and run the routed experts on the path `experts`
    names (EXPERT_PATHS; "dense" and "segmented" for unquantised experts only, quantised ones stay gathered)."""
    check_expert_path(experts)
    blocks = [m for _, m in model.named_modules() if isinstance(m, SparseMoeBlock)]

    def route(self, x):
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[:, : self.top_k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        weights = weights / weights.sum(-1, keepdims=True)
        if records is not None:
            records.append((probs, indices))
        return indices, weights.astype(x.dtype)

    classes = [b.__class__ for b in blocks]
    for block, cls in zip(blocks, classes):
        own_path = experts != "gathered" and type(block.experts) is Experts
        methods = {"route": route, "routed": ROUTED_FORWARD[experts]} if own_path else {"route": route}
        block.__class__ = type(cls.__name__, (cls,), methods)
    try:
        yield records
    finally:
        for block, cls in zip(blocks, classes):
            block.__class__ = cls


def load_balancing_loss(records) -> mx.array:
    """mean over layers of E * sum_e f_e * P_e: f_e the fraction of routed choices to expert e, P_e its mean
    router probability (Switch Transformer; Qwen MoE's aux loss)."""
    losses = []
    for probs, indices in records:
        E = probs.shape[-1]
        counts = mx.zeros((E,)).at[indices.flatten()].add(1.0)
        fraction = mx.stop_gradient(counts / indices.size)
        losses.append(E * (fraction * probs.mean(0)).sum())
    return sum(losses) / len(losses)


def hidden_states(model, batch):
    """Final-normed hidden states [B, L, H] of the batch (images and videos merged into the embeddings)."""
    ids = batch["input_ids"]
    if "pixel_values" in batch or "pixel_values_videos" in batch:
        encode = None
        if "image_features" in batch:  # given features replace the tower's output where the mask says

            def encode(pixels, grid):
                if pixels is not batch.get("pixel_values"):  # embed_multimodal encodes the videos apart
                    return model.model.visual(pixels, grid)
                keep = batch["image_features_mask"]
                if bool(keep.min() == 1):  # every picture given: the tower's output would be thrown away
                    return batch["image_features"]
                return keep * batch["image_features"] + (1 - keep) * model.model.visual(pixels, grid)

        embeddings, positions, _ = model.embed_multimodal(
            ids, batch.get("pixel_values"), batch.get("image_grid_thw"), batch.get("pixel_values_videos"),
            batch.get("video_grid_thw"), encode=encode)
        return model.model.language_model(None, None, embeddings, positions)
    return model.model.language_model(ids)


def target_weights(batch, prompt_weight: float = 0.0) -> mx.array:
    """Loss weight of each token as a target [B, L]: 1 on assistant tokens, `prompt_weight` on the prompt's
    text tokens (never on image or video placeholders or padding), 0 elsewhere."""
    weight = batch["mask"].astype(mx.float32)
    if prompt_weight and "prompt" in batch:
        weight = weight + prompt_weight * batch["prompt"].astype(mx.float32)
    return weight


def weighted_cross_entropy(logits_of, hidden, targets, weight) -> mx.array:
    """Sum over positions of weight x cross-entropy of `targets` [B, L] under `logits_of(hidden)`, where only the
    positions with a weight reach `logits_of` (the vocabulary head): a real Qwen 3.5's 248K-row head on every
    position of a 2,048-token batch row would be 2 GB of float32 logits, most of them for prompt tokens that
    carry no loss."""
    rows, cols = np.nonzero(np.asarray(weight) > 0)  # the weights are data (masks), not a function of the model
    if len(rows) == 0:
        return (hidden * 0).sum()
    rows, cols = mx.array(rows), mx.array(cols)
    logits = logits_of(hidden[rows, cols]).astype(mx.float32)
    return (nn.losses.cross_entropy(logits, targets[rows, cols], reduction="none") * weight[rows, cols]).sum()


def token_losses(model, batch, prompt_weight: float = 0.0):
    """(weighted sum of next-token cross-entropies over the targets, their total weight, hidden states): the
    assistant tokens, and the prompt's text tokens at `prompt_weight`."""
    h = hidden_states(model, batch)
    weight = target_weights(batch, prompt_weight)[:, 1:]
    return weighted_cross_entropy(model.logits, h[:, :-1], batch["input_ids"][:, 1:], weight), weight.sum(), h


def mtp_head(model):
    """The model's MTP head when the checkpoint has one (models.mtp.MTP: `hidden(h [B, L, H], next ids [B, L])`,
    then `logits(.)` of the token after next), else None and the MTP loss is skipped."""
    return getattr(model, "mtp", None) if callable(getattr(model, "mtp", None)) else None


def loss_fn(model, batch, config: TrainConfig, step: dict | None = None):
    """(loss, (target weight, {"ce", "aux", "mtp"})). `step`, when `batch` is one part of a step's rows
    (`step_totals`): the sums divided by the whole step's target weights, so the parts' losses and gradients add
    up to the step's, and the load-balancing loss the part's own times its share of the step's tokens (as
    data-parallel training takes it)."""
    aux_on = config.moe_aux_weight > 0 and model.config.text_config.is_moe
    records = [] if aux_on else None
    with trainable_router(model, records, experts=config.experts):
        total, count, h = token_losses(model, batch, config.prompt_loss_weight)
    loss = total / mx.maximum(step["count"] if step else count, 1.0)
    parts = {"ce": loss}
    if aux_on:
        parts["aux"] = load_balancing_loss(records) * (step["share"] if step else 1.0)
        loss = loss + config.moe_aux_weight * parts["aux"]
    head = mtp_head(model) if config.mtp_weight > 0 else None
    if head is not None:
        # position t sees h_t and token t+1 and predicts token t+2
        hidden = head.hidden(h[:, :-2], batch["input_ids"][:, 1:-1])
        weight = target_weights(batch, config.prompt_loss_weight)[:, 2:]
        total = weighted_cross_entropy(head.logits, hidden, batch["input_ids"][:, 2:], weight)
        parts["mtp"] = total / mx.maximum(step["mtp_count"] if step else weight.sum(), 1.0)
        loss = loss + config.mtp_weight * parts["mtp"]
    return loss, (count, parts)


def split_rows(rows: list, parts: int) -> list[list]:
    """`rows` in at most `parts` groups of rows adjacent in length order, cut so that the largest group's padded
    size (its rows times its longest row) is as small as it can be: one step's parts, each padded on its own.
    One part: `rows` as they are."""
    if parts <= 1 or len(rows) <= 1:
        return [list(rows)]
    ordered = sorted(rows, key=len)
    lengths = [len(r) for r in ordered]
    n, parts = len(ordered), min(parts, len(ordered))
    # best[p][j]: the smallest largest padded size of the first j rows in p groups, and where its last group starts
    best = [[(0, 0)] + [(math.inf, 0)] * n] + [[(math.inf, 0)] * (n + 1) for _ in range(parts)]
    for p in range(1, parts + 1):
        for j in range(1, n + 1):
            best[p][j] = min((max(best[p - 1][i][0], (j - i) * lengths[j - 1]), i) for i in range(j))
    groups, j = [], n
    for p in range(parts, 0, -1):
        i = best[p][j][1]
        groups.append(ordered[i:j])
        j = i
    return groups[::-1]


def step_totals(parts: list[dict], prompt_weight: float = 0.0) -> list[dict]:
    """For each part of a step's rows, `loss_fn`'s `step`: the whole step's target weights for the next token and
    for the token after next, and the part's share of the step's tokens."""
    weights = [target_weights(p, prompt_weight) for p in parts]
    count = sum(float(w[:, 1:].sum()) for w in weights)
    mtp_count = sum(float(w[:, 2:].sum()) for w in weights)
    tokens = sum(p["input_ids"].size for p in parts)
    return [{"count": count, "mtp_count": mtp_count, "share": p["input_ids"].size / tokens} for p in parts]


def warmup_cosine(peak: float, warmup: int, total: int, start: float, final: float):
    """Learning rate rising linearly from `start` to `peak` over `warmup` steps, then cosine-decaying to `final`
    by step `total`."""
    return optim.join_schedules([optim.linear_schedule(start, peak, warmup),
                                 optim.cosine_decay(peak, max(1, total - warmup), final)], [warmup])


class Trainer:
    def __init__(self, model, train_rows, config: TrainConfig, val_rows=None, output_dir=None):
        """`train_rows` None: every train_step is given its batch."""
        self.model, self.rows, self.val_rows, self.config = model, list(train_rows or []), list(val_rows or []), config
        self.output_dir = Path(output_dir) if output_dir else None
        if not self.rows and train_rows is not None:
            raise ValueError("no training rows")
        if config.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
        check_expert_path(config.experts)
        if config.workers < 1:
            raise ValueError(f"workers {config.workers}: 1 or more")
        cast_model(model, getattr(mx, config.dtype))
        if config.grad_checkpoint:
            enable_grad_checkpoint(model)
        if config.mtp_weight > 0 and mtp_head(model) is None:
            print("mtp_weight > 0 but this checkpoint has no MTP head (no mtp.* tensors, or "
                  "mtp_num_hidden_layers is 0): training without the MTP loss", file=sys.stderr)
        schedule = config.learning_rate
        if config.warmup_steps:
            schedule = optim.join_schedules([optim.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
                                             optim.constant(config.learning_rate) if hasattr(optim, "constant")
                                             else lambda _: config.learning_rate], [config.warmup_steps])
        self.optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
        self.step = self.skipped = 0
        self._value_and_grad = nn.value_and_grad(model, lambda m, b, step=None: loss_fn(m, b, config, step))
        self.group = parallel.group()
        vision = getattr(model.config, "vision_config", None)
        self.spatial_merge = getattr(vision, "spatial_merge_size", 2)
        self.history = []

    def batch_indices(self, step: int) -> list[int]:
        """The rows of step `step`: a fixed function of (seed, step), so a resumed run sees the same batches."""
        per_epoch = max(1, len(self.rows) // self.config.batch_size)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.rows))
        size = min(self.config.batch_size, len(self.rows))
        return order[i * size:(i + 1) * size].tolist()

    def train_step(self, batch: dict | list | None = None) -> dict:
        """One optimizer step on `batch`: a collated dict, or rows (in `config.workers` parts, `split_rows`, or in
        as many as the group has processes when it has more), or None: the rows this trainer holds for this step."""
        if batch is None:
            batch = [self.rows[i] for i in self.batch_indices(self.step)]
        if isinstance(batch, list):
            batch = [collate(part, self.config.pad_id, self.spatial_merge)
                     for part in split_rows(batch, parallel.parts(self.config.workers))]
        self.model.train()
        loss, count, parts, grads = self.gradients(batch)
        tokens = sum(b["input_ids"].size for b in (batch if isinstance(batch, list) else [batch]))
        grads, norm = optim.clip_grad_norm(grads, self.config.grad_clip or float("inf"))
        mx.eval(loss, norm)
        if not (math.isfinite(loss.item()) and math.isfinite(norm.item())):
            # A non-finite step is skipped rather than written into the weights (and counted).
            self.skipped += 1
            self.step += 1
            return {"step": self.step, "loss": float("nan"), "tokens": tokens, "skipped": 1}
        self.optimizer.update(self.model, grads)
        mx.eval(loss, count, parts, self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        return {"step": self.step, "loss": loss.item(), "tokens": tokens, **{k: v.item() for k, v in parts.items()}}

    def gradients(self, batch: dict | list[dict]):
        """(loss, target weight, {"ce", "aux", "mtp"}, gradients) of a collated batch, or of a step given in parts
        (`step_totals`), summed. In a group of processes (`parallel`) each takes every size-th part, and the sums
        are added across the group: each process ends with the whole step's."""
        parts = [batch] if isinstance(batch, dict) else list(batch)
        jobs = list(zip(parts, step_totals(parts, self.config.prompt_loss_weight) if len(parts) > 1 else [None]))
        rank, size = self.group.rank(), self.group.size()
        mine = jobs[rank::size]
        results = [self._grad(self.model, *job) for job in mine or jobs[:1]]
        values, grads = zip(*results)
        losses, extras = zip(*values)
        counts, sums = zip(*extras)
        total = (sum(losses), sum(counts), {k: sum(p[k] for p in sums) for k in sums[0]},
                 tree_map(lambda *g: sum(g[1:], g[0]), *grads))
        if size == 1:
            return total
        if not mine:  # fewer parts than processes: this one adds nothing
            total = tree_map(mx.zeros_like, total)
        return parallel.all_sum(total, self.group)

    def _grad(self, model, batch: dict, step: dict | None = None):
        """((loss, (target weight, parts)), gradients) of one batch or part."""
        # Checkpointed layers recompute in the backward pass, after loss_fn returned: keep routing trainable.
        with trainable_router(model, experts=self.config.experts), exact_activations():
            return self._value_and_grad(model, batch, step)

    def evaluate(self, rows=None) -> float:
        """Mean cross-entropy per assistant token over `rows` (default: the validation rows)."""
        rows = self.val_rows if rows is None else rows
        self.model.eval()
        total = count = 0.0
        for start in range(0, len(rows), self.config.batch_size):
            batch = collate(rows[start:start + self.config.batch_size], self.config.pad_id)
            with exact_activations():
                s, n, _ = token_losses(self.model, batch)
            mx.eval(s, n)
            total, count = total + s.item(), count + n.item()
        return total / max(count, 1.0)

    def fit(self, steps: int | None = None) -> list[dict]:
        steps = self.config.steps if steps is None else steps
        bar = _progress(steps, self.config.progress and self.group.rank() == 0)
        start, tokens = time.perf_counter(), 0
        for _ in range(steps):
            record = self.train_step()
            tokens += record["tokens"]
            record["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
            if self.config.eval_every and self.val_rows and self.step % self.config.eval_every == 0:
                record["val_loss"] = self.evaluate()
            if self.config.save_every and self.output_dir and self.step % self.config.save_every == 0:
                self.save(self.output_dir)
            self.history.append(record)
            bar.update(record)
        bar.close()
        return self.history

    def save(self, directory) -> Path:
        """trainable.safetensors, optimizer.safetensors and state.json (step, config); LoRA runs also write the
        adapter (adapters.safetensors + adapter_config.json) for `load(..., adapter=directory)`. In a group of
        processes only rank 0 writes (each holds the same weights)."""
        from .lora import lora_layers, save_adapter

        directory = Path(directory)
        if self.group.rank() != 0:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        trainable = dict(tree_flatten(self.model.trainable_parameters()))
        mx.save_safetensors(str(directory / "trainable.safetensors"), trainable)
        mx.save_safetensors(str(directory / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        (directory / "state.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config)}, indent=2))
        if lora_layers(self.model):
            save_adapter(self.model, directory)
        return directory

    def resume(self, directory):
        directory = Path(directory)
        files = [directory / n for n in ("trainable.safetensors", "optimizer.safetensors", "state.json")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a training checkpoint: missing {', '.join(missing)}")
        weights = mx.load(str(files[0]))
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        if weights.keys() != expected.keys():
            raise ValueError(f"{files[0]} holds other trainable parameters than this model "
                             f"({len(weights)} vs {len(expected)}): resume with the same LoRA/full setup")
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(files[1])).items()))
        self.step = json.loads(files[2].read_text())["step"]
        mx.eval(self.model.parameters(), self.optimizer.state)
        return self


class _progress:
    def __init__(self, total, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="train", dynamic_ncols=True)
            except ImportError:
                pass
        self.enabled = enabled

    def update(self, r):
        text = f"loss {r['loss']:.4f} | {r['tokens_per_s']:.0f} tok/s" + (
            f" | val {r['val_loss']:.4f}" if "val_loss" in r else "")
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.enabled:
            print(f"step {r['step']}: {text}", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
