"""Single-skill training probes for the default model (docs/default-model.md, "Why the image questions stayed
at chance"): train the default architecture on one kind of row and print the held-out answer accuracy
(`answer_accuracy`, teacher-forced greedy) as it goes. Exploratory: one run is one noisy measurement.

    .venv/bin/python scripts/probe_default_model.py --task big --steps 100 --every 25
    .venv/bin/python scripts/probe_default_model.py --task big --steps 100 --then big_shape --then-steps 150
"""

import argparse
import random
import time
from functools import partial
from pathlib import Path

import mlx_qwen35.platform  # noqa: F401  (OpenBLAS before MLX runs anything)
import mlx.optimizers as optim
from PIL import Image

from mlx_qwen35.train import default_model as dm
from mlx_qwen35.train import world
from mlx_qwen35.train.data import collate
from mlx_qwen35.train.vision_pretrain import pretrain_vision
from mlx_qwen35.train.trainer import TrainConfig, Trainer, warmup_cosine


def solid(rng):
    color = rng.choice(list(world.COLORS))
    image = Image.new("RGB", (rng.randint(64, 128), rng.randint(64, 128)), world.COLORS[color])
    return world._chat(world._user([{"type": "image", "image": image}], "What color is the image?"), f"{color}.")


def one_shape(rng, growth=1.0):
    scene = world.random_scene(rng, count=1, growth=growth)
    question, answer = world.ask_color(rng, scene)  # a lone shape is always unique
    return world._chat(world._user([{"type": "image", "image": world.draw(scene)}], question), answer)


def shrinking(rng, progress, ramp):
    return one_shape(rng, growth=min(1.0, progress[0] / ramp))


def copy_row(rng, low=4, high=16, digits_only=False):
    """"Repeat: ..." and the same `low`-`high` items back: a dense copying task (names, codes, cities, colours,
    numbers)."""
    pools = [world.NAMES, list(world.CITIES), list(world.COLORS), [f"{n:04d}" for n in range(10000)],
             [str(n) for n in range(1000)]]
    pools = pools[3:4] if digits_only else pools
    items = " ".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(low, high)))
    return world._chat({"role": "user", "content": f"Repeat: {items}"}, items)


def recall_one(rng, tokens=150, reach=1.0):
    """One "The code for NAME is DDDD." among ~`tokens` tokens of filler, then its question; the fact sits
    within the last `reach` of the filler (0: right before the question)."""
    name, code = rng.choice(world.NAMES), f"{rng.randint(0, 9999):04d}"
    sentences = [rng.choice(world.FILLER) for _ in range(max(1, int(tokens / 1.4) // 6))]
    sentences.insert(len(sentences) - rng.randint(0, int(reach * len(sentences))), f"The code for {name} is {code}.")
    text = " ".join(sentences) + f"\n\nWhat is the code for {name}?"
    return world._chat({"role": "user", "content": text}, f"{code}.")


def recall_reaching(rng, progress, ramp):
    return recall_one(rng, reach=min(1.0, progress[0] / ramp))


def recall_growing(rng, progress, ramp, questions=1):
    """The world's recall rows growing from one fact in ~150 tokens to 1-4 facts in up to 1,200 over `ramp`
    rows."""
    grown = min(1.0, progress[0] / ramp)
    return world.recall_example(rng, min_tokens=100, max_tokens=150 + int(1050 * grown), questions=questions,
                                facts=1 + round(3 * grown))


def sum_growing(rng, progress, ramp):
    """"What is {a} + {b}?" with a and b in 0..m, m growing from 9 to 99 over `ramp` rows: the one-digit table
    first, then carries into the tens and hundreds (thinking off)."""
    return world.sum_example(rng, thinking=False, largest=9 + round(90 * min(1.0, progress[0] / ramp)))


def recall_bind(rng, low=30, high=150, questions=4, facts=4):
    """A short passage with 2-4 facts asked about up to `questions` of them: choosing the asked name's code
    among several, without the length."""
    while True:
        example = world.recall_example(rng, min_tokens=low, max_tokens=high, questions=questions, facts=facts)
        if example["messages"][0]["content"].count("The code for") >= 2:
            return example


def recall_bind_names(rng, names=3, questions=4):
    """recall_bind with the passage's names drawn from the first `names` of the world's 24: binding among a
    few known names before any name."""
    full = world.NAMES
    world.NAMES = full[:names]
    try:
        return recall_bind(rng, questions=questions, facts=min(4, names))
    finally:
        world.NAMES = full


def side_of_picture(rng, growth=0.5):
    """One shape clearly in the left or right third of the picture: "Is the {color} {shape} on the left or
    the right?" (absolute position, a curriculum step before left/right of another shape)."""
    while True:
        scene = world.random_scene(rng, count=1, growth=growth)
        shape = scene.shapes[0]
        if shape.cx < scene.width / 3 or shape.cx > 2 * scene.width / 3:
            answer = "Left." if shape.cx < scene.width / 2 else "Right."
            user = world._user([{"type": "image", "image": world.draw(scene)}],
                               f"Is the {shape.name} on the left or the right?")
            return world._chat(user, answer)


def text_binding(rng, low=2, high=3):
    """"The {shape} is {color}. ..." about `low`-`high` different shapes, then the colour of one: binding in
    text (one shape: plain copying)."""
    shapes = rng.sample(world.SHAPES, rng.randint(low, high))
    colors = rng.sample(list(world.COLORS), len(shapes))
    facts = " ".join(f"The {s} is {c}." for s, c in zip(shapes, colors))
    asked = rng.randrange(len(shapes))
    return world._chat({"role": "user", "content": f"{facts} What color is the {shapes[asked]}?"}, f"{colors[asked]}.")


def code_binding(rng, low=2, high=3, names=None, digits=4):
    """The recall facts with no filler between them, "The code for {name} is {DDDD}. ..." about `low`-`high`
    names (of the first `names` of the world's, default all), then "What is the code for {name}?": text
    binding's form with recall's names and (by default) four-digit answers."""
    chosen = rng.sample(world.NAMES[:names], rng.randint(low, high))
    codes = [f"{rng.randint(0, 10 ** digits - 1):0{digits}d}" for _ in chosen]
    facts = " ".join(f"The code for {n} is {c}." for n, c in zip(chosen, codes))
    asked = rng.randrange(len(chosen))
    return world._chat({"role": "user", "content": f"{facts} What is the code for {chosen[asked]}?"},
                       f"{codes[asked]}.")


def fact_binding(rng, keys, values, fact, question, low=2, high=3):
    """`low`-`high` facts `fact.format(key=, value=)` about different keys, then `question.format(key=)` of one:
    binding with the key set, value set and sentence forms chosen separately."""
    chosen = rng.sample(keys, rng.randint(low, high))
    answers = rng.sample(values, len(chosen))
    facts = " ".join(fact.format(key=k, value=v) for k, v in zip(chosen, answers))
    asked = rng.randrange(len(chosen))
    return world._chat({"role": "user", "content": f"{facts} {question.format(key=chosen[asked])}"},
                       f"{answers[asked]}.")


def name_color_growing(rng, progress, ramp, hold=0):
    """`name_color` whose names grow from the first 3 (for the first `hold` rows) to all of them over the next
    `ramp` rows: whether binding learned on a few keys carries over as keys are added."""
    grown = max(0.0, min(1.0, (progress[0] - hold) / ramp))
    names = world.NAMES[:3 + int((len(world.NAMES) - 3) * grown)]
    return fact_binding(rng, names, list(world.COLORS), "The {key} is {value}.", "What color is the {key}?")


def mimetic_attention(model):
    """Mimetic initialisation (Trockman & Kolter 2023): each query head starts as a copy of its KV head's key
    projection, so attention starts by matching similar tokens."""
    import mlx.core as mx
    from mlx_qwen35.models.attention import GatedAttention

    for _, module in model.named_modules():
        if isinstance(module, GatedAttention):
            D, per_kv = module.head_dim, module.num_heads // module.num_kv_heads
            rows = []
            for h in range(module.num_heads):
                kv = h // per_kv
                rows += [module.k_proj.weight[kv * D:(kv + 1) * D], module.q_proj.weight[(2 * h + 1) * D:(2 * h + 2) * D]]
            module.q_proj.weight = mx.concatenate(rows, axis=0)
    mx.eval(model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="big", help="solid, one_shape, big, shrinking, mixed_big, "
                        "conversations_big, a world question (color, shape, count, left_right, describe) or one "
                        "about one large shape (big_shape, big_count, ...)")
    parser.add_argument("--eval-task", help="held-out rows of these tasks, comma-separated (default: --task)")
    parser.add_argument("--layers", type=int, default=dm.TEXT_CONFIG["num_hidden_layers"])
    parser.add_argument("--attention-interval", type=int, default=dm.TEXT_CONFIG["full_attention_interval"])
    parser.add_argument("--rope-theta", type=float, default=dm.TEXT_CONFIG["rope_parameters"]["rope_theta"])
    parser.add_argument("--beta2", type=float, default=0.999, help="AdamW's second-moment decay")
    parser.add_argument("--mtp-weight", type=float, default=0.3)
    parser.add_argument("--mimetic", action="store_true", help="mimetic attention initialisation")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tokens-per-batch", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--prompt-loss", type=float, default=0.0, help="loss weight of the prompt's text tokens "
                        "(TrainConfig.prompt_loss_weight)")
    parser.add_argument("--vision-lr", type=float, default=1.0, help="vision tower learning rate multiplier; "
                        "0 freezes it")
    parser.add_argument("--pretrain-vision", type=int, default=0, help="steps of vision tower pretraining "
                        "on the world's labels first (train/vision_pretrain.py); saved and reused per step count")
    parser.add_argument("--ramp", type=int, default=2400, help="rows over which `shrinking` reaches world sizes and "
                        "`recall_reaching` / `recall_growing` their full reach and length")
    parser.add_argument("--then", help="a second stage: this task mixed half and half with --task")
    parser.add_argument("--then-steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation and the training rows")
    parser.add_argument("--city-words", action="store_true", help="the world tokenizer splits cities off their space")
    args = parser.parse_args()

    progress = [0]
    tasks = {"solid": solid, "one_shape": one_shape, "big": partial(one_shape, growth=0.0),
             "shrinking": partial(shrinking, progress=progress, ramp=args.ramp),
             "mixed_big": partial(world.image_example, growth=0.0),
             "conversations_big": lambda rng: world.image_conversation(rng, turns=rng.randint(1, 4), growth=0.0),
             "conversations": lambda rng: world.image_conversation(rng, turns=rng.randint(1, 4))}
    tasks.update({name: partial(world.image_example, question=ask) for name, ask in world.SCENE_QUESTIONS.items()})
    tasks.update(copy=copy_row, copy_short=partial(copy_row, low=1, high=3),
                 recall_one=recall_one, recall_near=partial(recall_one, reach=0.0),
                 recall_tiny=partial(world.recall_example, min_tokens=10, max_tokens=40, facts=1),
                 recall_growing=partial(recall_growing, progress=progress, ramp=args.ramp),
                 recall_growing4=partial(recall_growing, progress=progress, ramp=args.ramp, questions=4),
                 recall_1000=partial(world.recall_example, min_tokens=1000, max_tokens=1000),
                 recall_300=partial(world.recall_example, min_tokens=300, max_tokens=300),
                 recall_reaching=partial(recall_reaching, progress=progress, ramp=args.ramp), copy_code=partial(copy_row, low=1, high=1, digits_only=True), text_binding=text_binding, recall_bind=recall_bind, big_video=partial(world.video_example, growth=0.0), side_of_picture=side_of_picture,
                 recall_bind_names3=partial(recall_bind_names, names=3),
                 code_copy=partial(code_binding, low=1, high=1), code_binding=code_binding,
                 code_binding3=partial(code_binding, names=3),
                 digit_copy=partial(code_binding, low=1, high=1, digits=1), digit_binding=partial(code_binding, digits=1),
                 digit_copy3=partial(code_binding, low=1, high=1, digits=1, names=3),
                 digit_binding3=partial(code_binding, digits=1, names=3),
                 name_color_copy=partial(fact_binding, keys=world.NAMES, values=list(world.COLORS), low=1, high=1,
                                         fact="The {key} is {value}.", question="What color is the {key}?"),
                 name_color=partial(fact_binding, keys=world.NAMES, values=list(world.COLORS),
                                    fact="The {key} is {value}.", question="What color is the {key}?"),
                 name_color3_copy=partial(fact_binding, keys=world.NAMES[:3], values=list(world.COLORS), low=1,
                                          high=1, fact="The {key} is {value}.", question="What color is the {key}?"),
                 name_color3=partial(fact_binding, keys=world.NAMES[:3], values=list(world.COLORS),
                                     fact="The {key} is {value}.", question="What color is the {key}?"),
                 name_color_growing=partial(name_color_growing, progress=progress, ramp=args.ramp),
                 name_color_held=partial(name_color_growing, progress=progress, ramp=args.ramp, hold=4000),
                 code_color3_copy=partial(fact_binding, keys=world.NAMES[:3], values=list(world.COLORS), low=1,
                                          high=1, fact="The code for {key} is {value}.",
                                          question="What is the code for {key}?"),
                 code_color3=partial(fact_binding, keys=world.NAMES[:3], values=list(world.COLORS),
                                     fact="The code for {key} is {value}.", question="What is the code for {key}?"),
                 code_name3_copy=partial(fact_binding, keys=world.NAMES[:3], values=world.NAMES[3:], low=1, high=1,
                                         fact="The code for {key} is {value}.", question="What is the code for {key}?"),
                 code_name3=partial(fact_binding, keys=world.NAMES[:3], values=world.NAMES[3:],
                                    fact="The code for {key} is {value}.", question="What is the code for {key}?"),
                 code_digit3_nospace_copy=partial(fact_binding, keys=world.NAMES[:3], values=list("0123456789"),
                                                  low=1, high=1, fact="The code for {key} is{value}.",
                                                  question="What is the code for {key}?"),
                 code_digit3_nospace=partial(fact_binding, keys=world.NAMES[:3], values=list("0123456789"),
                                             fact="The code for {key} is{value}.", question="What is the code for {key}?"),
                 code4_nospace3_copy=partial(fact_binding, keys=world.NAMES[:3], values=[str(c) for c in range(1000, 10000)],
                                             low=1, high=1, fact="The code for {key} is{value}.",
                                             question="What is the code for {key}?"),
                 code4_nospace3=partial(fact_binding, keys=world.NAMES[:3], values=[str(c) for c in range(1000, 10000)],
                                        fact="The code for {key} is{value}.", question="What is the code for {key}?"),
                 name_color8_copy=partial(fact_binding, keys=world.NAMES[:8], values=list(world.COLORS), low=1,
                                          high=1, fact="The {key} is {value}.", question="What color is the {key}?"),
                 name_color8=partial(fact_binding, keys=world.NAMES[:8], values=list(world.COLORS),
                                     fact="The {key} is {value}.", question="What color is the {key}?"),
                 shape_digit_copy=partial(fact_binding, keys=world.SHAPES, values=list("0123456789"), low=1, high=1,
                                          fact="The code for the {key} is {value}.",
                                          question="What is the code for the {key}?"),
                 shape_digit_plain_copy=partial(fact_binding, keys=world.SHAPES, values=list("0123456789"), low=1,
                                                high=1, fact="The {key} is {value}.", question="What is the {key}?"),
                 shape_digit_plain=partial(fact_binding, keys=world.SHAPES, values=list("0123456789"),
                                           fact="The {key} is {value}.", question="What is the {key}?"),
                 shape_digit=partial(fact_binding, keys=world.SHAPES, values=list("0123456789"),
                                     fact="The code for the {key} is {value}.", question="What is the code for the {key}?"),
                 recall_bind_names3_1=partial(recall_bind_names, names=3, questions=1), video=lambda rng: world.video_example(rng),
                 recall_bind1=partial(recall_bind, questions=1),
                 recall_bind_300=partial(recall_bind, low=300, high=300, questions=1), text_copy=partial(text_binding, low=1, high=1), tool=world.tool_example, recall_short=partial(world.recall_example, max_tokens=300),
                 sum=partial(world.sum_example, thinking=False),
                 sum_growing=partial(sum_growing, progress=progress, ramp=args.ramp))
    # left/right needs two shapes: growth 0.34 draws one or two, a little smaller
    tasks.update({f"big_{name}": partial(world.image_example, question=ask, growth=0.34 if name == "left_right" else 0.0)
                  for name, ask in world.SCENE_QUESTIONS.items()})

    dm.TEXT_CONFIG.update(num_hidden_layers=args.layers, full_attention_interval=args.attention_interval)
    dm.TEXT_CONFIG["rope_parameters"] = dict(dm.TEXT_CONFIG["rope_parameters"], rope_theta=args.rope_theta)
    skeleton = Path(f"/tmp/probe-default-model-{args.layers}-{args.attention_interval}-{args.rope_theta:g}"
                    + "-cities" * args.city_words)
    _, processor = dm.write_skeleton(skeleton, seed=0, city_words=args.city_words)
    model = dm.build_model(skeleton, seed=args.seed)
    if args.mimetic:
        mimetic_attention(model)
    if args.pretrain_vision:
        saved = skeleton / f"vision-{args.pretrain_vision}.safetensors"
        if saved.exists():
            model.model.visual.load_weights(str(saved))
        else:
            pretrain_vision(model.model.visual, processor, steps=args.pretrain_vision)
            model.model.visual.save_weights(str(saved))

    def cycle(names, rng):
        return tasks[names[rng.randrange(len(names))]](rng)

    for name in list(args.task.split(",")) + (args.then or "").split(",") + (args.eval_task or "").split(","):
        if "+" in name:
            tasks[name] = partial(cycle, name.split("+"))

    def rows(make, seed):
        rng, thinking_rng = random.Random(seed), random.Random(seed + 1)
        while True:
            progress[0] += 1
            yield dm.encode_example(dict(make(rng), thinking=False), processor, thinking_rng)

    held_out = {}
    for name in dict.fromkeys((args.eval_task or args.task).split(",") + ([args.then] if args.then else [])):
        stream = rows(tasks[name], seed=999)
        held_out[name] = [next(stream) for _ in range(args.held_out)]
    progress[0] = 0
    total = args.steps + (args.then_steps if args.then else 0)
    first = rows(tasks[args.task], seed=args.seed)

    def mixed():
        second = rows(tasks[args.then], seed=args.seed + 1)
        while True:
            yield next(first)
            yield next(second)

    trainer = Trainer(model, None, TrainConfig(steps=total, learning_rate=args.learning_rate,
                                               moe_aux_weight=0.01, mtp_weight=args.mtp_weight, progress=False, grad_clip=1.0,
                                               weight_decay=0.01, experts="segmented",
                                               prompt_loss_weight=args.prompt_loss))

    def schedule(scale):
        peak = args.learning_rate * scale
        return warmup_cosine(peak, args.warmup, total, start=1e-7, final=peak * 0.05)

    if args.vision_lr == 0:
        model.model.visual.freeze()
        trainer.optimizer = optim.AdamW(learning_rate=schedule(1.0), betas=[0.9, args.beta2], weight_decay=0.01)
    else:
        trainer.optimizer = optim.MultiOptimizer(
            [optim.AdamW(learning_rate=schedule(args.vision_lr), betas=[0.9, args.beta2], weight_decay=0.01),
             optim.AdamW(learning_rate=schedule(1.0), betas=[0.9, args.beta2], weight_decay=0.01)],
            [lambda path, _: path.startswith("model.visual")])

    start, tokens, seen, losses = time.perf_counter(), 0, 0, []
    batches = dm.length_batches(first, args.tokens_per_batch, seed=args.seed)
    for step in range(1, total + 1):
        if step == args.steps + 1:
            batches = dm.length_batches(mixed(), args.tokens_per_batch, seed=args.seed + 1)
        batch = next(batches)
        seen += len(batch)
        record = trainer.train_step(collate(batch, pad_id=0))
        tokens += record["tokens"]
        losses.append(record["ce"])
        if step % args.every == 0 or step in (args.steps, total):
            model.eval()
            right = "  ".join(f"{name} {dm.answer_accuracy(dm.teacher_forced(model), held):.0%}"
                              for name, held in held_out.items())
            elapsed = time.perf_counter() - start
            print(f"step {step}  rows {seen}  ce {sum(losses) / len(losses):.3f}  held-out right: {right}  "
                  f"{tokens / elapsed:.0f} tok/s  {elapsed:.0f} s", flush=True)
            losses = []


if __name__ == "__main__":
    main()
