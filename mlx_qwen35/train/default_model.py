"""`mlx-qwen35 train-default`: train the shipped default model from a seed on the synthetic world.

The model is the real Qwen 3.5 architecture at small width: MoE decoder (Gated DeltaNet and gated attention),
vision tower, MTP head, and a byte-level BPE learned from the world's text (world_tokenizer.py). Rows are drawn
from `world.examples(seed)`, grouped by length into batches of about `tokens_per_batch` tokens, and trained
with AdamW (warmup, cosine decay), the MoE load-balancing loss and the MTP loss. Everything is a function of
the seed; the run writes its log beside the weights."""

import argparse
import itertools
import json
import math
import random
import shutil
import string
import sys
import tempfile
import time
from collections import Counter
from fractions import Fraction
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..kernels.activations import exact as exact_activations
from ..loading import DEFAULT_MODEL_PATH as SHIPPED_PATH
from . import parallel
from .trainer import EXPERT_PATHS

TEXT_CONFIG = dict(
    model_type="qwen3_5_moe_text", vocab_size=1024, hidden_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=48, max_position_embeddings=32768,
    rms_norm_eps=1e-6, hidden_act="silu", linear_conv_kernel_dim=4, linear_key_head_dim=32,
    linear_value_head_dim=32, linear_num_key_heads=4, linear_num_value_heads=8, full_attention_interval=2,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128,
    rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5,
                         mrope_section=[4, 4, 4], mrope_interleaved=True),
    mtp_num_hidden_layers=1, tie_word_embeddings=True,
)
VISION_CONFIG = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=192,
                     patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=196,
                     in_channels=3, hidden_act="gelu_pytorch_tanh")
# The world's images are 64-224 px: keep them at their own size (rounded to 32 px), so a picture is 4-49 tokens.
PREPROCESSOR = {"size": {"shortest_edge": 32 * 32, "longest_edge": 224 * 224}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
# The world's videos are 4-8 frame lists (taken as 24 fps clips): sampling at 24 fps keeps every frame; a
# video file gives at most 8 frames spread over its length.
VIDEO_PREPROCESSOR = dict(PREPROCESSOR, fps=24.0, min_frames=4, max_frames=8)
# Read, though, a picture smaller than READING_SIDE x READING_SIDE px is enlarged to that area (aspect kept), as
# Qwen's min_pixels does: the tower, trained on the world's sizes, confuses small circles and squares (radius
# under 12 px: 80 % of shape answers right, 96 % above), and an enlarged small picture is a large picture of the
# same world (radius scales with the side). Run 40 answered shape 91 -> 98 %, colour 96 -> 98.5 %, count 79 ->
# 83 % of 400 (docs/default-model.md, forty-second session). Training keeps the world's sizes (PREPROCESSOR:
# fewer tokens, and the recipe the shipped weights were made with); the written preprocessor_config.json, which
# every reader of the model loads, enlarges.
READING_SIDE = 160
READING_PREPROCESSOR = dict(PREPROCESSOR, size=dict(PREPROCESSOR["size"], shortest_edge=READING_SIDE ** 2))
# The training mix leans on the visual questions (cheap rows, the hardest skills) and keeps recall passages at
# most 1,200 tokens (the evaluation asks at 1,000): recall and tool rows cost 10-30x an image row, so a recall
# passage is asked about up to RECALL_QUESTIONS of its names and a tool row (its ~350-token tool declarations)
# holds 1-TOOL_TURNS tool uses. Run 7 found one fact at 1,000 tokens every time and chose among several 3 % of
# the time: passages hold several facts early (after RECALL_FACTS_GROWTH of the curriculum) while still short.
# Addition is learned in a jump after about 20,000-25,000 sums (probes of sums alone: 56-59 % right after 19,200,
# 89-95 % after 25,600); spread through the mix (42 % of the rows, runs 7-12) the jump came late or not at all. So
# SUM_STAGE sums come alone in a stage of their own (about 625 steps), and the mix keeps addition at 20 % of the
# rows. Run 13 took the stage's steps from the mix and its tool calls fell to 78 %; run 14 added 300 steps (3,100)
# and gave tools 10 % of the rows: sums 94/93 % against run 10's 75/76. Runs 13-14 placed the stage after the
# first stage, and held-out video fell to 0 in it and ended at 62 % (run 10: 72); run 15 opens the curriculum
# with it: video 69 %, sums 95/98 % (docs/default-model.md).
TRAIN_MIX = {"image": 0.40, "multi_image": 0.10, "video": 0.10, "sum": 0.20, "recall": 0.07, "tool": 0.10,
             "copy": 0.03}
# Counting rows (`count_example`: the world's count question, each answer 0-4 equally often) in the mixed stage,
# at this weight beside TRAIN_MIX's (0: none). The world's pictures answer 0 or 1 four times in five, and no run
# has answered "2." more than 4 times in 30; a fresh decoder on the tower's output, trained on the world's count
# questions alone, answered "2." 0 of 20 after 600 steps, and with half of its rows counting rows 9 of 20. At 0.1
# (run 38) the full recipe still did not count ("2." 2 of 30, count 40.7 % against run 37's 43.7), so it stays
# off (docs/default-model.md, thirty-first session).
COUNT_ROWS = 0.0
# Since run 36 the opening holds twice run 31's rows (BINDING_STAGE below), sums keeping their share.
SUM_STAGE = 40_000
RECALL_MAX_TOKENS = 1200
RECALL_QUESTIONS = 4
RECALL_FACTS_GROWTH = 0.25
TOOL_TURNS = 3
THINKING_OFF = 0.3
# The curriculum (docs/default-model.md): from the world's own small shapes, or with five kinds of question at
# once, a model of this size never starts reading the image; one large shape and one question do start it.
# Likewise recall: copying a lone code ("Repeat: 4821") is learned at once and then finding one fact in a
# passage follows; recall passages alone never start. Video direction starts from one large shape crossing
# the whole picture (64 % on the world's videos after 3,840 such rows; run 9, without them, 36 % after its
# whole run). The first stage interleaves those large-shape colour and video rows with copy rows and sums; then
# image scenes and videos grow to the world's (world.random_scene's `growth`) and
# recall passages from one fact in 100-150 tokens to 1-4 facts in 100-RECALL_MAX_TOKENS, over
# CURRICULUM_EXAMPLES rows (the number of facts over the first RECALL_FACTS_GROWTH of them).
FIRST_STAGE = 12_000
CURRICULUM_EXAMPLES = 30_000
# Single-picture scenes grow over their own number of mixed rows. At 30,000 (runs 15-21) a picture holds one shape
# until growth 1/3 and four only at the end, so a scaffold over the first 10,000 rows (run 18) never saw a
# picture with a shape to choose (docs/default-model.md, run 22). Since run 30 they are grown from the start.
PICTURE_CURRICULUM = 0
# The first stage's colour rows ask about one large shape. A decoder that has learned that (1,600-3,200 rows) no
# longer forms choosing the asked shape among several in 4,800 rows, even on the scaffold's clean keys (92-99/150
# colour questions), where a fresh decoder forms it (141/150; docs/default-model.md, run 22). GROWN_FIRST_STAGE asks
# them about the world's own scenes instead, read through the scaffold. Not enough alone: run 23 had not formed
# the choice on the clean keys by step 2,000 in the recipe's mix (docs); on since run 30, with the two below.
GROWN_FIRST_STAGE = True
# With TOWER_FIRST_STAGE those scenes read the tower instead: once the binding stage has formed the choice, picture
# rows on the scaffold pull the tower's reading of it down (runs 25 and 26: 131/150 through the tower at step 800,
# 81 at 1,100 and 32 at 2,000 in run 26; docs); through the tower it kept 130-134 to the end (runs 27, 28 and 30).
TOWER_FIRST_STAGE = True
# A binding stage: `binding_stage` colour questions about the world's scenes, read through the scaffold, shuffled
# among the sum stage's sums, so the decoder forms choosing the asked shape before anything offers it another way to
# answer. The recipe's mix never formed it (run 23); after the sum stage 300 steps of them alone left it at 85/150
# (run 24); alone before the sums they formed it (148/150 in 200 steps; colour 80 % at the end, run 20 64 %) and
# the sums then never jumped (run 25); shuffled 1:2 among sums a fresh decoder forms both (probe: 146/150 and sums
# 64 % after 16,700 rows; docs). On since run 30 (colour 64 % to 92 % with TOWER_FIRST_STAGE, run 27).
# Since run 36: 9,600 colour and 9,600 shape questions (BINDING_QUESTIONS), so the opening grew (SUM_STAGE); since
# run 40, 24,000 rows, so counting rows join them with shape's 12,000 kept.
BINDING_STAGE = 24_000
# What the binding stage and the grown first stage ask, one drawn at random a row (a name given twice is drawn
# twice as often). Run 31 (colour alone) names a shape 61/66 with one shape in the picture and 82/134 with two to
# four, 50 of its 57 wrong answers another shape's kind, and answers "How many?" with "1." whatever the picture
# holds, where a fresh decoder on the scaffold counts 75/100 after 9,600 rows. Colour, shape and count in turn (run
# 32) took count from 42 to 66 % (mostly "0." for an absent kind), left shape where it was and colour fell from
# 97 to 83 % (docs/default-model.md, twenty-seventh session). Colour and shape with 9,600 rows each in a doubled
# opening (run 34) formed shape's lookup: 91 % against 68 (docs, twenty-eighth session). A third each colour, shape
# and counting rows (run 39, 6,400 each) took count from 44 to 72 of 100 and shape's lookup from 92 to 70; 6,000
# colour, 12,000 shape and 6,000 counting rows (run 40): count 83.7 % of 300, shape 91.3 %, colour 97.3 % (docs,
# thirty-second and thirty-third sessions). Since run 40.
BINDING_QUESTIONS = ("color", "shape", "shape", "counting")
# Answered from kinds and colours, all the scaffold holds; "counting" is `count_example`'s counting rows, which
# on the scaffold count two and carry to the tower where through the tower alone they do not (probes, docs/
# default-model.md, thirty-first session).
# "side" is `ask_side`'s one-lookup place question, a curriculum question as counting is.
SCAFFOLD_QUESTIONS = ("color", "shape", "count", "counting", "side")
IMAGE_TURNS = 4
STEPS = 4800
# Run 31's opening (20,000 sums and 9,600 binding questions) filled about 925 steps of its 3,400-step schedule. A
# longer opening can be stretched over the same part of the learning-rate schedule (`stretched_opening`,
# `--stretch-opening`), so the rows after it see the rates they saw there: run 34 doubled the opening on one
# cosine over 4,000 steps, and its mixed stage, at about half run 31's rate summed over its steps, lost recall
# (50 %) and tool calls; run 35 stretched it (docs). `--schedule-steps` keeps an opening's rates and stretches
# the steps after it instead (`stretched_after_opening`).
OPENING_ROWS, OPENING_STEPS = 29_600, 925
# The recipe's schedule is run 34's, of 4,000 steps: its doubled opening (about 1,850 steps) at those rates, where
# shape's lookup forms, and the 2,950 steps after it through the rest of that schedule (`stretched_after_opening`),
# where run 34's 2,150 left recall at 50 % (run 36, docs). Used when `steps` is STEPS.
SCHEDULE_STEPS = 4000
# The vision tower first learns the world's shapes on its own (train/vision_pretrain.py), then trains with the
# decoder at a tenth of the learning rate so the decoder's first, noisy gradients do not wash that out.
VISION_PRETRAIN_STEPS = 3000
VISION_LR_SCALE = 0.1
# Pictures of up to 8 shapes (vision_pretrain.picture_item's `max_shapes`) gave the tower 82 % kind against 79 %
# with the world's 1-4; run 16 took them, answered the shape question better and lost its tool calls (67 %), so
# runs 15-30 kept 4. Run 31 took them again, with cities in pieces and the tool tail: kind 85.9 % against 83.4 %,
# tool calls 300/300, video 70 % against 59 (docs/default-model.md). On since run 31.
VISION_MAX_SHAPES = 8
# A head that reads, at each clip's shape-centre tokens, which way the shape moves within the token's frame pair
# (vision_pretrain's `motion_weight`; 0: none). The decoder answers video direction 68-73 % in runs 31-40: over a
# whole clip the mover may cross less than one 32 px token, so its place alone tells the direction poorly, while
# the tower's first layer sees both frames of a pair in one patch. Run 43 (weight 1, 12 clips a batch) answered
# video 93 % against 66 % and lost 6-9 points of colour, shape and count; run 44 (weight 1, 24 pictures + 12
# clips) answered video 98 % with colour and count at run 40's, shape 89 against 95 (docs/default-model.md). Off
# here, with 4 clips, until that recipe runs where it fits the 90 minutes (152 min on the AVX2 machine).
VISION_MOTION_WEIGHT = 0.0
# Each tower pretraining batch: this many world pictures and this many clips (vision_pretrain.batch).
VISION_PICTURES = 24
VISION_CLIPS = 4
# The binding scaffold (docs/default-model.md, "Forming the binding"): a decoder does not form choosing one of
# several shapes by kind on the tower's output (84-94/150 colour questions in probes, whatever was tried), forms
# it on clean keys (the tower's class means at the shapes' centres, zeros elsewhere: 146/150 after 4,800 rows)
# and keeps it on the tower's output (128/150). For the first `scaffold_rows` rows of the mixed stage picture
# rows read `vision_pretrain.scaffold_features` instead of the tower. Off: in the full recipe (run 18, 10,000
# rows) it helped the shape question by 7 points, not colour, and that run lost its tool calls; runs 15 and 20
# had none. Run 22 (18,000 rows, pictures grown by mixed row 4,000) did not form the choice either: the first
# stage's lone shapes block it (GROWN_FIRST_STAGE below).
SCAFFOLD_ROWS = 0
# The scaffold's centre tokens also carry their place across and down along the tower's own directions for it
# (`vision_pretrain.position_directions`). A fresh decoder trained on `ask_side` ("Is the {color} {shape} on the
# left or the right?") on that scaffold, then on the world's left/right through the tower, answered left/right
# 91-92 of 100; without the places, or through the frozen tower alone, side was not learned in the same rows, and
# with colour questions shuffled in beside both stages left/right stayed at one answer, as in every run (probes,
# docs/default-model.md, thirty-eighth session). Off until a recipe gives side and left/right stages of their own.
SCAFFOLD_POSITION = False
# Two stages of their own after the opening (its binding questions and sums), each alone, as the probe that carried
# left/right ran them: SIDE_STAGE side questions on the scaffold with places (needs SCAFFOLD_POSITION), then
# LEFT_RIGHT_STAGE of the world's left/right questions through the tower; the first stage and the mix follow.
# Shuffled among other questions neither stage carried (probes, docs/default-model.md, thirty-eighth and
# thirty-ninth sessions). Off: no recipe has run them yet.
SIDE_STAGE = 0
LEFT_RIGHT_STAGE = 0
# The same two stages late: after the schedule's steps, at its final rate, LATE_STAGES steps of side rows on the
# scaffold (class means of the tower as it is then), LATE_STAGES of left/right rows through the tower, then the
# settling steps, whose mix draws lone left/right questions at SETTLE_LEFT_RIGHT beside SETTLE_MIX's. Run 40
# continued so (2e-4, 450 + 450 steps of 1,024 tokens, 800 settling ones): left/right 46 to 80 %, the rest
# within a few points; at the recipe's final rate (1e-4, 2,048-token steps) only 57 (docs/default-model.md,
# thirty-ninth session), so the stages want a rate of their own. Off: no recipe has run them yet.
LATE_STAGES = 0
SETTLE_LEFT_RIGHT = 0.0
# The late stages alone at four times the final rate took count from 80 to 74 % (400 questions) while left/right
# rose to 92; with the mixed stage's image conversations spread among their rows at a quarter of them, count kept
# 80 and left/right reached 95 (continuations of run 44, docs/default-model.md, forty-second session). The stages
# keep their LATE_STAGES steps, so give them more: with half their own rows left/right stayed at 57 %, and about
# 450 steps each hold the rows that kept count. Off: no recipe has run it yet.
LATE_IMAGES = 0.0
# After the two late stages, this many steps of counting rows (`count_example`, each count 0-4 equally often)
# through the tower, at their rate and with their image conversations. Continued from run 40 so (4,800 rows,
# about 310 steps of 2,048 tokens, then the settling mix), count rose from 87.0 to 91.2 % (400 questions) and
# threes were counted for the first time; colour and shape kept (docs/default-model.md, forty-third session).
# After the side and left/right stages it added nothing (357 of 400 with and without it, forty-fourth session),
# and it kept its lift alone with the tower frozen but lost it with the tower at the decoder's rate. Off.
LATE_COUNT_STAGE = 0
LATE_STAGES_SEED = 555  # the late stages' scenes: a stream of their own, apart from the tails'
# The tool call writes its city after a newline ("<parameter=city>\nLima"), the question after a space (" Lima"):
# two tokens of Qwen's pre-tokenisation, so a call must translate each city while add()'s digits are the same
# tokens in both places (calls 98/98 in every run). Runs 16 and 18 never learned the translation (a call for
# "Paris" whatever was asked), run 15 did; our reading: attending to the city earns nothing until the
# translation exists, and the reverse, so it forms by chance. With CITY_WORDS the world tokenizer splits the
# world's cities off their leading space, so the call copies the question's own token. Alone (run 19) it
# called seven cities right and London never (93 %); with the tool-heavy tail below (run 20) all eight (docs).
CITY_WORDS = True
# With CITY_WORDS the question's city was the call's own token for four cities and pieces of other words for
# four (transformers loads the tokenizer with Qwen's regex alone). The four copied cities never separated: in run
# 27 their call's margin stayed within 1.5 logits of another copied city from step 1,200 to the end (London
# called for Lima, 20 of 20), while the four translated ones reached 5-8 by step 2,400. CITY_PIECES writes every
# city in pieces after a space, so every call translates (world_tokenizer._pieces_after_space; docs). On
# since run 30.
CITY_PIECES = True
BATCH_POOL = 64  # rows sorted by length together before they are cut into batches
# A tool-heavy tail: the last `tool_tail` steps draw a fresh full-growth stream (world seed + TOOL_TAIL_SEED) with
# TOOL_TAIL_MIX, tools about 31 % of the rows instead of 9 %. Run 19's weather calls were still improving at its
# end (held-out tool lines 75-81 %), and 200 such steps after it called London, its one failing city, 13/13
# (a continuation, docs). Run 20, the shipped model, took its last 300 steps so: 300 of 300 held-out calls.
TOOL_TAIL_STEPS = 353  # since run 36 (of 4,800 steps), as run 34 took (of 4,000)
TOOL_TAIL_MIX = dict(TRAIN_MIX, tool=0.40)
TOOL_TAIL_SEED = 99
# Settling steps: after the schedule ends, SETTLE_STEPS more at its final rate draw a fresh stream (world seed +
# SETTLE_SEED) with SETTLE_MIX, video a third of the rows. Continuations of run 36 (docs): 600 such steps took
# video from 62 to 71 % and recall from 96 to 100 %, where 300 on TRAIN_MIX left video at 63. Since run 37.
SETTLE_STEPS = 600
SETTLE_MIX = dict(TRAIN_MIX, video=0.40)
SETTLE_SEED = 777
# AdamW's second-moment decay: 0.95 (GPT-3's, nanoGPT's) instead of 0.999 let the decoder learn in-context
# binding ("The circle is red. ... What color is the circle?") in 4,000 rows instead of never (docs).
ADAM_BETAS = [0.9, 0.95]
# How the routed experts run in training (trainer.EXPERT_PATHS): the same sums in another order, so another run
# bit for bit. Run 40, the shipped model, ran "dense" (all 8 experts); "segmented" (each expert's own rows) is
# about 1.2x the tok/s on these CPUs in one process, "gathered" in two processes (WORKERS) 1.48x segmented's
# (docs/benchmarks.md): that pair is for the next shipped run.
EXPERTS = "dense"
# A step's rows in this many parts, each part's loss and gradients in a process of its own (TrainConfig.workers,
# train/parallel.py): the same token-mean losses, the load-balancing loss each part's own, so another run. Run 40
# ran 1.
WORKERS = 1
# Held-out answers every 200 steps: a check (144 rows through the model) added 6-12 s to its step in run 46e's
# log, each process then answering every row; every 100 steps that was 7-13 % of the run. The rows are now
# dealt out among the processes (`held_out_scores`), and the checks come half as often.
PROBE_EVERY = 200


def write_skeleton(directory: Path, seed: int, city_words: bool = CITY_WORDS,
                   city_pieces: bool = CITY_PIECES) -> tuple[dict, object]:
    """config.json, preprocessor configs (pictures read enlarged: READING_PREPROCESSOR) and the world tokenizer
    (`city_words`: CITY_WORDS, `city_pieces`: CITY_PIECES) in `directory`; returns (config dict, the processor
    training encodes with: `training_processor`)."""
    from ..tokenizer import load_tokenizer, write_tokenizer_files
    from . import world
    from .world_tokenizer import train_world_tokenizer

    tokenizer, added = train_world_tokenizer(seed=seed, whole_words=tuple(world.CITIES) if city_words else (),
                                             pieces_after_space=city_pieces)
    ids = {text: token_id for token_id, text, _ in added}
    text_config = dict(TEXT_CONFIG, eos_token_id=ids["<|im_end|>"])
    if tokenizer.get_vocab_size() > text_config["vocab_size"]:
        raise ValueError(f"the world tokenizer has {tokenizer.get_vocab_size()} entries, more than the model's "
                         f"vocab_size {text_config['vocab_size']}")
    config = dict(model_type="qwen3_5_moe", text_config=text_config, vision_config=VISION_CONFIG,
                  tie_word_embeddings=True, eos_token_id=ids["<|im_end|>"], image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(READING_PREPROCESSOR, indent=2))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=2))
    write_tokenizer_files(directory, tokenizer, added)
    return config, training_processor(load_tokenizer(directory))


def training_processor(tokenizer, pictures: dict = PREPROCESSOR):
    """The processor training encodes the world's rows with, around a model's `tokenizer`: pictures and clips at
    the world's own sizes (PREPROCESSOR, VIDEO_PREPROCESSOR), not its preprocessor_config.json's; `pictures`:
    another picture config (READING_PREPROCESSOR: pictures enlarged as they are read)."""
    from ..processing.processor import Processor

    return Processor(tokenizer, pictures, VIDEO_PREPROCESSOR)


def initial_weights(model, seed: int) -> dict:
    """Normal(0, 0.02) matrices, PyTorch's conv init for the DeltaNet short convolution, Mamba-style decay
    rates and step sizes, the tower's sine-cosine position table, zero biases; norms as the modules build
    them."""
    mx.random.seed(seed)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        if name.endswith("A_log"):
            value = mx.log(mx.random.uniform(1.0, 16.0, param.shape))
        elif name.endswith("dt_bias"):
            # Mamba's step sizes, log-uniform in [0.001, 0.1], stored as their inverse softplus: with A in
            # [1, 16] each DeltaNet head starts remembering from about one token to about a thousand.
            dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), param.shape))
            value = dt + mx.log(-mx.expm1(-dt))
        elif name == "model.visual.pos_embed.weight":
            value = sincos_positions(*param.shape)
        elif name.endswith("conv1d.weight"):
            bound = 1.0 / math.sqrt(param.shape[-1])
            value = mx.random.uniform(-bound, bound, param.shape)
        elif param.ndim >= 2:
            value = 0.02 * mx.random.normal(param.shape)
        elif name.endswith(".bias"):
            # the modules draw their biases when they are built, before the seed: zero them so the seed decides
            value = mx.zeros(param.shape)
        else:
            value = param
        weights[name] = value.astype(mx.float32)
    return weights


def sincos_positions(count: int, size: int) -> mx.array:
    """A square table of 2-D sine-cosine position embeddings (ViT/MAE's): half the channels encode the row,
    half the column, at geometric frequencies. The tower interpolates this table to each picture's grid, so a
    token's position is linearly readable from the start; Normal(0, 0.02) entries drown under the patch
    content and the tower took hundreds of steps to find where anything is."""
    side = math.isqrt(count)
    quarter = size // 4
    freqs = 1.0 / 10_000 ** (np.arange(quarter) / quarter)
    grid = np.arange(side, dtype=np.float64)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    parts = [f(axis.reshape(-1, 1) * freqs) for axis in (rows, cols) for f in (np.sin, np.cos)]
    return mx.array(np.concatenate(parts, axis=1), dtype=mx.float32)


def build_model(directory: Path, seed: int):
    from ..config import ModelConfig
    from ..models.mtp import mtp_num_layers
    from ..models.qwen35 import Model

    raw = json.loads((directory / "config.json").read_text())
    model = Model(ModelConfig.from_dict(raw), mtp_layers=mtp_num_layers(raw))
    model.update(tree_unflatten(list(initial_weights(model, seed).items())))
    mx.eval(model.parameters())
    return model


def encode_example(example, processor, rng: random.Random, add_vision_id: bool = False):
    """A world example as a training Row, rendered as a thinking-on or thinking-off conversation: sums as the
    world says, other questions thinking-off with probability THINKING_OFF (their answers are the same);
    `add_vision_id`: the template's "Picture n: " before each picture."""
    from .data import encode

    thinking = example.get("thinking")
    thinking = rng.random() >= THINKING_OFF if thinking is None else thinking
    return encode({k: v for k, v in example.items() if k != "thinking"}, processor, enable_thinking=thinking,
                  add_vision_id=add_vision_id)


def training_examples(seed: int, first_stage: int = FIRST_STAGE, curriculum: int = CURRICULUM_EXAMPLES,
                      sum_stage: int = SUM_STAGE, mix: dict = TRAIN_MIX, picture_curriculum: int | None = None,
                      grown_first_stage: bool = False, binding_stage: int = 0,
                      binding_questions: tuple = ("color",), side_stage: int = 0, left_right_stage: int = 0):
    """The training curriculum: `sum_stage` sums with `binding_stage` questions about the world's scenes
    shuffled among them (BINDING_STAGE; drawn from `binding_questions`, names in `world.SCENE_QUESTIONS`, as are
    the grown first stage's); then `side_stage` side questions (`ask_side`) and `left_right_stage` of the world's
    left/right questions, each stage alone, about the world's scenes; then `first_stage` rows that cycle through "What color
    is the {shape}?" about one large shape, a code to repeat, a sum and the direction of one large shape
    crossing a video; then the world's examples drawn with `mix` (TRAIN_MIX), image rows as 1-IMAGE_TURNS question
    conversations whose scenes (and videos) grow to the world's (growth 0 to 1) over the next `curriculum` mixed
    rows, as recall passages grow from one fact to 1-4 and to RECALL_MAX_TOKENS; `picture_curriculum` (None:
    `curriculum`) gives the single-picture scenes a growth of their own; `grown_first_stage` asks the first
    stage's colour questions about the world's scenes instead of one large shape."""

    from . import world

    rng = random.Random(seed)
    generators = dict(world.GENERATORS, copy=copy_example, count=count_example,
                      tool=lambda rng: world.tool_example(rng, turns=rng.randint(1, TOOL_TURNS)),
                      left_right=partial(world.image_example, question=world.ask_left_right))
    scene_questions = dict(world.SCENE_QUESTIONS, side=ask_side)
    asks = [(lambda rng, growth: count_example(rng)) if name == "counting"
            else partial(world.image_example, question=scene_questions[name]) for name in binding_questions]

    def binding_question(rng, growth=1.0):
        # one question name draws nothing from the stream, so colour alone replays the shipped runs' rows
        ask = asks[0] if len(asks) == 1 else rng.choice(asks)
        return ask(rng, growth=growth)

    first = [partial(binding_question, growth=1.0) if grown_first_stage
             else partial(world.image_example, question=world.ask_color, growth=0.0),
             copy_example, world.sum_example,
             partial(world.video_example, growth=0.0)]
    kinds, weights = list(mix), list(mix.values())
    picture_curriculum = curriculum if picture_curriculum is None else picture_curriculum
    opening = [True] * binding_stage + [False] * sum_stage
    if binding_stage:  # without it the stream stays the shipped runs' draw for draw
        rng.shuffle(opening)
    for colour in opening:
        yield binding_question(rng) if colour else world.sum_example(rng)
    for _ in range(side_stage):
        yield world.image_example(rng, question=ask_side)
    for _ in range(left_right_stage):
        yield world.image_example(rng, question=world.ask_left_right)
    for drawn in range(first_stage):
        yield first[drawn % len(first)](rng)
    for drawn in itertools.count():
        kind = rng.choices(kinds, weights)[0]
        growth = grown_share(drawn, curriculum)
        if kind == "image":
            yield world.image_conversation(rng, turns=rng.randint(1, IMAGE_TURNS),
                                           growth=grown_share(drawn, picture_curriculum))
        elif kind == "video":
            yield world.video_example(rng, growth=growth)
        elif kind == "recall":
            yield world.recall_example(rng, max_tokens=150 + round(growth * (RECALL_MAX_TOKENS - 150)),
                                       questions=RECALL_QUESTIONS,
                                       facts=1 + round(3 * min(1.0, growth / RECALL_FACTS_GROWTH)))
        else:
            yield generators[kind](rng)


def stretched_opening(schedule, opening_steps: int, stretch: float):
    """`schedule` for a run whose opening takes `stretch` times its `opening_steps` steps: the opening passes
    through the same part of the schedule, more slowly, and every step after it sees the rate that step less the
    added steps sees in `schedule`. `stretch` 1 (or less) leaves `schedule` as it is."""
    if stretch <= 1:
        return schedule
    long_opening = opening_steps * stretch

    def stretched(step):
        step = mx.array(step).astype(mx.float32)
        return schedule(mx.where(step < long_opening, step / stretch, step - long_opening + opening_steps))

    return stretched


def stretched_after_opening(schedule, opening_steps: int, stretch: float):
    """`schedule` for a run whose steps after its first `opening_steps` take `stretch` times as many: the opening
    sees `schedule` as it is, and the rest passes through the remainder of it, more slowly. `stretch` 1 (or
    less) leaves `schedule` as it is."""
    if stretch <= 1:
        return schedule

    def stretched(step):
        step = mx.array(step).astype(mx.float32)
        return schedule(mx.where(step < opening_steps, step, opening_steps + (step - opening_steps) / stretch))

    return stretched


def question_shares(names) -> str:
    """"color" for ("color",); "color 2/3, count 1/3" for ("color", "color", "count"): each name's share of the
    draws, for the log."""
    counts = Counter(names)
    if len(counts) == 1:
        return names[0]
    return ", ".join(f"{name} {Fraction(count, len(names))}" for name, count in counts.items())


def grown_share(drawn: int, rows: int) -> float:
    """Growth after `drawn` of a curriculum `rows` long (0: grown from the start)."""
    return min(1.0, drawn / rows) if rows else 1.0


def copy_example(rng: random.Random) -> dict:
    """"Repeat: DDDD" -> "DDDD.": a curriculum row, not a world question. Copying a code is what recall
    answers with; learned alone it is what lets recall start (docs/default-model.md)."""
    from . import world

    code = f"{rng.randint(0, 9999):04d}"
    return world._chat({"role": "user", "content": f"Repeat: {code}"}, f"{code}.")


def ask_side(rng: random.Random, scene):
    """"Is the {color} {shape} on the left or the right?" -> "Left." / "Right." about a shape unique by colour and
    kind whose centre lies outside the picture's middle third, or None: a curriculum question, not a world
    question. One place read at one shape, where the world's left/right compares two; the first shape's half
    alone answers about 90 % of the world's left/right questions."""
    from . import world

    named = [s for s in scene.shapes if len(world.unique(scene, kind=s.kind, color=s.color)) == 1
             and abs(s.cx - scene.width / 2) > scene.width / 6]
    if not named:
        return None
    shape = rng.choice(named)
    return f"Is the {shape.name} on the left or the right?", "Left." if shape.cx < scene.width / 2 else "Right."


def count_example(rng: random.Random) -> dict:
    """The world's "How many {shape}s are there?" about a picture of the world's 1-4 shapes holding 0-4 of the
    asked kind, each count equally often, the rest of other kinds: a curriculum row, not a world question."""
    from . import world

    kind = rng.choice(world.SHAPES)
    n = rng.randint(0, world.MAX_SHAPES)
    others = [k for k in world.SHAPES if k != kind]
    rest = rng.randint(n == 0, world.MAX_SHAPES - n)
    pairs = ([(kind, rng.choice(list(world.COLORS))) for _ in range(n)]
             + [(rng.choice(others), rng.choice(list(world.COLORS))) for _ in range(rest)])
    rng.shuffle(pairs)
    scene = world.random_scene(rng, count=len(pairs), fixed=pairs)
    question, answer = world.ask_count(rng, scene, kind=kind)
    example = world._chat(world._user([{"type": "image", "image": world.draw(scene)}], question), answer)
    example["scenes"] = [scene]
    return example


def world_rows(seed: int, processor, means: dict | None = None, scaffold_rows: int = 0, sum_stage: int = SUM_STAGE,
               first_stage: int = FIRST_STAGE, curriculum: int = CURRICULUM_EXAMPLES, mix: dict = TRAIN_MIX,
               picture_curriculum: int | None = None, grown_first_stage: bool = False, binding_stage: int = 0,
               tower_first_stage: bool = False, binding_questions: tuple = ("color",), side_stage: int = 0,
               left_right_stage: int = 0):
    """Endless training rows drawn from the world with `seed` (`training_examples`); with the tower's `means`
    (`vision_pretrain.class_means`), picture rows of the binding stage and the side stage, among the first
    `scaffold_rows` of the mixed stage and, with `grown_first_stage` but not `tower_first_stage`, of the first
    stage carry the binding scaffold's image features; the left/right stage reads the tower."""
    rng = random.Random(seed + 1)
    side_until = binding_stage + sum_stage + side_stage
    first_from = side_until + left_right_stage
    mixed_from = first_from + first_stage
    scaffold_from = first_from if grown_first_stage and not tower_first_stage else mixed_from
    examples = training_examples(seed, first_stage=first_stage, curriculum=curriculum, sum_stage=sum_stage, mix=mix,
                                 picture_curriculum=picture_curriculum, grown_first_stage=grown_first_stage,
                                 binding_stage=binding_stage, binding_questions=binding_questions,
                                 side_stage=side_stage, left_right_stage=left_right_stage)
    for index, example in enumerate(examples):
        row = encode_example(example, processor, rng)
        on_scaffold = index < side_until or scaffold_from <= index < mixed_from + scaffold_rows
        yield on_the_scaffold(row, example, means) if means is not None and on_scaffold else row


def grown_rows(seed: int, processor, mix: dict = TRAIN_MIX):
    """Endless rows of the grown world drawn with `mix` (`world_rows` with no opening and no curriculum): the
    streams of the tails and the late stages, apart from the curriculum's."""
    return world_rows(seed, processor, sum_stage=0, first_stage=0, curriculum=0, mix=mix)


def on_the_scaffold(row, example, means: dict):
    """`row` with its pictures' image features the binding scaffold's (`vision_pretrain.scaffold_features`);
    rows without pictures, or with a video, as they are."""
    from .vision_pretrain import scaffold_features

    if row.image_grid_thw is not None and row.pixel_values_videos is None and example.get("scenes"):
        row.image_features = np.concatenate([scaffold_features(means, scene, tuple(int(v) for v in grid))
                                             for scene, grid in zip(example["scenes"], row.image_grid_thw)])
    return row


def interleaved(rows, others, share: float):
    """`rows` with rows of `others` spread evenly among them, `share` of all the rows given (to the row): after i
    of `rows`, floor(i * share / (1 - share)) of `others` are due, and each comes before the row that makes it due.
    Ends with `rows`."""
    share = Fraction(share).limit_denominator(10_000)
    ratio = share / (1 - share)
    for index, row in enumerate(rows):
        for _ in range(math.floor((index + 1) * ratio) - math.floor(index * ratio)):
            yield next(others)
        yield row


def question_rows(seed: int, processor, ask, means: dict | None = None):
    """Endless rows of one question (`ask`, a scene question) about the world's scenes; with `means`, their
    pictures read through the binding scaffold."""
    from . import world

    rng, encode_rng = random.Random(seed), random.Random(seed + 1)
    while True:
        example = world.image_example(rng, question=ask)
        row = encode_example(example, processor, encode_rng)
        yield on_the_scaffold(row, example, means) if means is not None else row


def length_batches(rows, tokens_per_batch: int, pool: int = BATCH_POOL, seed: int = 0):
    """Group a stream of rows into batches of similar length with at most `tokens_per_batch` padded tokens
    (a longer row goes alone), shuffled within each pool of rows; a finite stream ends with its last pool."""
    rng, rows = random.Random(seed), iter(rows)
    while bucket := sorted(itertools.islice(rows, pool), key=len):
        batches, current = [], []
        for row in bucket:
            if current and len(row) * (len(current) + 1) > tokens_per_batch:
                batches.append(current)
                current = []
            current.append(row)
        batches.append(current)
        rng.shuffle(batches)
        yield from batches


def probe_rows(seed: int, processor, per_kind: int = 16) -> dict:
    """Held-out rows per skill (world seed far from the training stream's), thinking off, for
    `answer_accuracy` during training: the image questions one by one, then the other kinds."""
    from . import world

    rng = random.Random(seed + 7_000_003)
    makers = {name: partial(world.image_example, question=world.SCENE_QUESTIONS[name])
              for name in ("color", "shape", "count", "left_right")}
    makers.update(multi_image=world.multi_image_example, video=world.video_example,
                  sum=partial(world.sum_example, thinking=False), recall=partial(world.recall_example, max_tokens=600),
                  tool=world.tool_example)
    return {kind: [encode_example(dict(make(rng), thinking=False), processor, rng) for _ in range(per_kind)]
            for kind, make in makers.items()}


def teacher_forced(model):
    """`model`'s predictions of tokens 1..L-1 of a batch given its true prefix: `answer_accuracy`'s `logits_fn`."""
    from .trainer import hidden_states

    return lambda batch: model.logits(hidden_states(model, batch)[:, :-1])


def answer_accuracy(logits_fn, rows, batch_size: int = 16) -> float:
    """Share of rows whose every assistant token is the argmax of `logits_fn(batch)` ([B, L-1, V] predictions
    of tokens 1..L-1) given the true prefix: greedy decoding's answer without running generation."""
    return right_answers(logits_fn, rows, batch_size) / max(1, len(rows))


def right_answers(logits_fn, rows, batch_size: int = 16) -> int:
    """How many of `rows` `answer_accuracy` counts right."""
    from .data import collate

    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id=0)
        predicted = logits_fn(batch).argmax(-1)
        wrong = ((predicted != batch["input_ids"][:, 1:]) & batch["mask"][:, 1:]).sum(-1)
        correct += int((wrong == 0).sum())
    return correct


def held_out_scores(logits_fn, probes: dict, parts: int = 1) -> dict:
    """`answer_accuracy` on each kind of `probes`, each kind's rows in `parts` batches (every parts-th
    row; as many as the group has processes when it has more) dealt out among the group's processes, the right
    answers added across it: the same batches, so the same numbers, in one process or several."""
    members, parts = parallel.group(), parallel.parts(parts)
    right = [sum(right_answers(logits_fn, rows[part::parts], batch_size=len(rows))
                 for part in range(parts) if (index * parts + part) % members.size() == members.rank())
             for index, rows in enumerate(probes.values())]
    if members.size() > 1:
        right = parallel.all_sum(mx.array(right, mx.float32), members).tolist()
    return {kind: round(count) / max(1, len(rows)) for (kind, rows), count in zip(probes.items(), right)}


class RecipeError(ValueError):
    """A train-default setting that cannot run, refused before anything is written. Its text names the settings
    as `train_default`'s parameters (late_rate); `flags()` names them as the command line's (--late-rate)."""

    def __init__(self, template: str, *values):
        """`template`: str.format fields {setting} for names, {0}, {1}, ... for `values`."""
        self.template, self.values = template, values
        super().__init__(self.named(lambda setting: setting))

    def __reduce__(self):  # raised in a training process, re-raised in the one that started it (`parallel`)
        return type(self), (self.template, *self.values)

    def named(self, name) -> str:
        class Names(dict):
            def __missing__(self, setting):
                return name(setting)

        return string.Formatter().vformat(self.template, self.values, Names())

    def flags(self) -> str:
        return self.named(lambda setting: "--" + FLAGS.get(setting, setting).replace("_", "-"))


FLAGS = {"settle_steps": "settle"}  # train_default's parameters whose flags are not their names


def recipe_plan(*, vision_weights, scaffold_rows, sum_stage, binding_stage, picture_curriculum, side_stage,
                left_right_stage, settle_steps, late_stages, late_count_stage, count_rows, vision_motion,
                settle_left_right, experts, workers, tool_tail, steps, stretch_opening, warmup, schedule_steps,
                vision_pictures, vision_clips, scaffold_position, late_rate, late_images, tower_first_stage,
                grown_first_stage, city_pieces, city_words, binding_questions, **_) -> tuple:
    """Refuse a `train_default` setting that cannot run (RecipeError, naming it; FileNotFoundError for a missing
    tower), before anything is written or any process started; else what follows from the settings: (tool_tail,
    opening_steps, stretch, added_steps, schedule_steps, mix_stretch). Takes train_default's arguments by name."""
    if vision_weights and not Path(vision_weights).is_file():
        raise FileNotFoundError(f"--vision-weights: no such file {vision_weights}")
    for setting, rows in (("scaffold_rows", scaffold_rows), ("sum_stage", sum_stage),
                          ("binding_stage", binding_stage), ("picture_curriculum", picture_curriculum),
                          ("side_stage", side_stage), ("left_right_stage", left_right_stage)):
        if rows < 0:
            raise RecipeError(f"{{{setting}}} {{0}}: a number of rows, 0 or more", rows)
    for setting, count in (("settle_steps", settle_steps), ("late_stages", late_stages),
                           ("late_count_stage", late_count_stage)):
        if count < 0:
            raise RecipeError(f"{{{setting}}} {{0}}: a number of steps, 0 or more", count)
    for setting, weight in (("count_rows", count_rows), ("vision_motion", vision_motion),
                            ("settle_left_right", settle_left_right)):
        if weight < 0:
            raise RecipeError(f"{{{setting}}} {{0}}: a weight, 0 or more", weight)
    if experts not in EXPERT_PATHS:
        raise RecipeError(f"{{experts}} {{0!r}}: one of {', '.join(EXPERT_PATHS)}", experts)
    if workers < 1:
        raise RecipeError("{workers} {0}: 1 or more", workers)
    if tool_tail is None:
        tool_tail = round(TOOL_TAIL_STEPS * steps / STEPS)
    opening_rows = sum_stage + binding_stage
    opening_steps = round(OPENING_STEPS * opening_rows / OPENING_ROWS)
    stretch = opening_rows / OPENING_ROWS if stretch_opening else 1.0
    added_steps = round(OPENING_STEPS * (stretch - 1)) if stretch > 1 else 0
    if added_steps and steps <= added_steps + warmup:
        raise RecipeError(f"{{steps}} {{0}}: an opening of {opening_rows} rows adds {added_steps} steps to the "
                          f"schedule, and the rest must outlast the warm-up ({warmup})", steps)
    if schedule_steps is not None and stretch_opening:
        raise RecipeError("{schedule_steps}: not with {stretch_opening} (one stretch of the schedule at a time)")
    if schedule_steps is None:
        schedule_steps = SCHEDULE_STEPS if steps == STEPS and not stretch_opening else steps
    if schedule_steps != steps and not opening_steps + warmup < schedule_steps <= steps:
        raise RecipeError(f"{{schedule_steps}} {{0}}: more than the opening's ~{opening_steps} steps and the "
                          f"warm-up ({warmup}), and no more than {{steps}} ({{1}})", schedule_steps, steps)
    mix_stretch = (steps - opening_steps) / (schedule_steps - opening_steps) if schedule_steps != steps else 1.0
    if vision_pictures < 0 or vision_clips < 0 or vision_pictures + vision_clips == 0:
        raise RecipeError("{vision_pictures} {0}, {vision_clips} {1}: counts of a tower pretraining batch's items, "
                          "0 or more, not both 0", vision_pictures, vision_clips)
    unplaced = "(on the scaffold without places the side question was not learned)"
    if side_stage and not scaffold_position:
        raise RecipeError("{side_stage}: only with {scaffold_position} " + unplaced)
    if late_rate is not None and not (late_stages and late_rate > 0):
        raise RecipeError("{late_rate} {0}: a rate above 0, with {late_stages}", late_rate)
    if late_count_stage and not late_stages:
        raise RecipeError("{late_count_stage}: only with {late_stages} (it follows them, at their rate)")
    if late_stages and not scaffold_position:
        raise RecipeError("{late_stages}: only with {scaffold_position} " + unplaced)
    if late_images and not (late_stages and 0 < late_images < 1):
        raise RecipeError("{late_images} {0}: a share of the late stages' rows, above 0 and below 1, with "
                          "{late_stages}", late_images)
    if not 0 <= tool_tail <= steps:
        raise RecipeError("{tool_tail} {0}: a number of steps from 0 to {steps} ({1})", tool_tail, steps)
    if tower_first_stage and not grown_first_stage:
        raise RecipeError("{tower_first_stage}: only with {grown_first_stage} (the one-large-shape first stage reads "
                          "the tower already)")
    if city_pieces and not city_words:
        raise RecipeError("{city_pieces}: only with {city_words} (the cities as tokens of their own in the call)")
    unknown = [name for name in binding_questions if name not in SCAFFOLD_QUESTIONS]
    if unknown or not binding_questions:
        raise RecipeError(f"{{binding_questions}} {{0}}: one or more of {SCAFFOLD_QUESTIONS}",
                          tuple(binding_questions))
    return tool_tail, opening_steps, stretch, added_steps, schedule_steps, mix_stretch


@parallel.over_processes("workers", check=lambda settings: recipe_plan(**settings))
@exact_activations()  # the logged accuracies, like the weights, must not depend on the inference activations
def train_default(output: Path, seed: int = 0, steps: int = STEPS, tokens_per_batch: int = 2048,
                  vision_steps: int = VISION_PRETRAIN_STEPS, vision_weights: Path | None = None,
                  scaffold_rows: int = SCAFFOLD_ROWS, city_words: bool = CITY_WORDS, city_pieces: bool = CITY_PIECES,
                  tool_tail: int | None = None, picture_curriculum: int = PICTURE_CURRICULUM,
                  grown_first_stage: bool = GROWN_FIRST_STAGE, binding_stage: int = BINDING_STAGE,
                  tower_first_stage: bool = TOWER_FIRST_STAGE, binding_questions: tuple = BINDING_QUESTIONS,
                  sum_stage: int = SUM_STAGE, stretch_opening: bool = False, schedule_steps: int | None = None,
                  settle_steps: int = SETTLE_STEPS, count_rows: float = COUNT_ROWS,
                  vision_motion: float = VISION_MOTION_WEIGHT, vision_pictures: int = VISION_PICTURES,
                  vision_clips: int = VISION_CLIPS, scaffold_position: bool = SCAFFOLD_POSITION,
                  side_stage: int = SIDE_STAGE, left_right_stage: int = LEFT_RIGHT_STAGE,
                  late_stages: int = LATE_STAGES, late_count_stage: int = LATE_COUNT_STAGE,
                  settle_left_right: float = SETTLE_LEFT_RIGHT,
                  late_rate: float | None = None, late_images: float = LATE_IMAGES, experts: str = EXPERTS,
                  workers: int = WORKERS, learning_rate: float = 2e-3, warmup: int = 100, log_every: int = 25,
                  probe_every: int = PROBE_EVERY, progress: bool = True) -> Path:
    """Train the default model into `output` (written atomically: weights, configs, tokenizer, training_log.txt).
    At logging steps that are multiples of `probe_every` (0: never) the log also gets held-out per-skill
    answer accuracy (`held_out_scores` on `probe_rows`). `vision_weights`: a tower that `pretrain_vision`
    already trained (with this seed and `vision_steps`) to start from instead of pretraining again.
    `scaffold_rows`: the binding scaffold's length (SCAFFOLD_ROWS); `city_words`: CITY_WORDS; `city_pieces`:
    CITY_PIECES; `tool_tail`: the tool-heavy tail's steps, taken from `steps` (None: the recipe's
    TOOL_TAIL_STEPS of STEPS, in proportion);
    `picture_curriculum`: mixed rows over which single-picture scenes grow (PICTURE_CURRICULUM);
    `grown_first_stage`: GROWN_FIRST_STAGE; `binding_stage`: BINDING_STAGE; `tower_first_stage`: TOWER_FIRST_STAGE;
    `binding_questions`: BINDING_QUESTIONS; `sum_stage`: the opening's sums (SUM_STAGE); `stretch_opening`: an
    opening longer than run 31's runs through its part of the learning-rate schedule (`stretched_opening`);
    `schedule_steps`: the schedule is that of a run of this many steps, and the steps after the opening pass
    through its remainder more slowly to fill `steps` (`stretched_after_opening`; None: SCHEDULE_STEPS
    for STEPS, else `steps`); `settle_steps`: steps added after `steps` at the schedule's final rate, drawing
    SETTLE_MIX (SETTLE_STEPS); `count_rows`: the mixed stage's weight of counting rows (`count_example`,
    COUNT_ROWS) beside TRAIN_MIX's; `vision_motion`: the tower pretraining's motion head weight
    (VISION_MOTION_WEIGHT); `vision_pictures`, `vision_clips`: each tower pretraining batch's pictures and clips
    (VISION_PICTURES, VISION_CLIPS); `scaffold_position`: the scaffold's centre tokens carry their place (SCAFFOLD_POSITION);
    `side_stage`, `left_right_stage`: the stages of side, then left/right questions after the opening (SIDE_STAGE,
    LEFT_RIGHT_STAGE); `late_stages`: steps of side rows, then as many of left/right rows, after `steps` and before
    the settling steps (LATE_STAGES); `late_count_stage`: steps of counting rows after them (LATE_COUNT_STAGE);
    `late_rate`: the decoder's learning rate in the late stages (the tower's
    a VISION_LR_SCALE of it; None: the schedule's final rate); `late_images`: the share of the late stages' rows
    that are the mixed stage's image conversations through the tower (LATE_IMAGES); `settle_left_right`: the
    settling mix's weight of lone left/right questions (SETTLE_LEFT_RIGHT); `experts`: how the routed experts run
    (EXPERTS, one of trainer.EXPERT_PATHS); `workers`: the run in this many processes, each step's rows and each
    tower pretraining batch in as many parts (WORKERS; train/parallel.py)."""
    settings = dict(locals())
    from ..platform import cpu_setup
    from . import world
    from .trainer import TrainConfig, Trainer, warmup_cosine
    from .vision_pretrain import class_means, pretrain_vision

    tool_tail, opening_steps, stretch, added_steps, schedule_steps, mix_stretch = recipe_plan(**settings)
    run_start = time.perf_counter()
    output = Path(output)
    writer = parallel.rank() == 0  # in a group of processes (`workers`) the others write nothing
    partial = output.with_name(output.name + ".partial") if writer else Path(tempfile.mkdtemp(prefix="mlx-qwen35-"))
    shutil.rmtree(partial, ignore_errors=True)
    config, processor = write_skeleton(partial, seed, city_words, city_pieces)
    model = build_model(partial, seed)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log_lines = [f"# mlx-qwen35 train-default: seed {seed}, {vision_steps} vision pretraining steps, {steps} steps "
                 f"of ~{tokens_per_batch} tokens, peak lr {learning_rate}, {n_params / 1e6:.2f}M parameters, "
                 f"{cpu_setup()}" + (", cities as words of their own in the tokenizer" if city_words else "")
                 + (", in pieces after a space" if city_pieces else "")
                 + (f", the last {tool_tail} steps tool-heavy (TOOL_TAIL_MIX)" if tool_tail else "")
                 + (f", then {settle_steps} steps at the final learning rate (SETTLE_MIX)" if settle_steps else "")
                 + (f", counting rows at weight {count_rows} in the mixed stage" if count_rows else "")
                 + (f", the tower pretrained to read motion too (weight {vision_motion})" if vision_motion else "")
                 + (f", {vision_pictures} pictures and {vision_clips} clips a tower pretraining batch"
                    if (vision_pictures, vision_clips) != (VISION_PICTURES, VISION_CLIPS) else "")
                 + (", the scaffold's centre tokens with their places" if scaffold_position else "")
                 + (f", after the opening {side_stage} side questions on the scaffold" if side_stage else "")
                 + (f", {'then' if side_stage else 'after the opening'} {left_right_stage} left/right questions "
                    "through the tower" if left_right_stage else "")
                 + (f", after the schedule {late_stages} steps of side questions on the scaffold, then {late_stages} "
                    "of left/right questions through the tower" if late_stages else "")
                 + (f", then {late_count_stage} of counting rows" if late_count_stage else "")
                 + (f" at learning rate {late_rate}" if late_rate is not None else "")
                 + (f", {late_images:.0%} of their rows the mixed stage's image conversations" if late_images else "")
                 + (f", lone left/right questions at weight {settle_left_right} in the settling mix"
                    if settle_left_right else "")
                 + (f", the routed experts {experts}" if experts != EXPERTS else "")
                 + (f", each step's rows in {workers} parts in as many processes" if workers != WORKERS else "")
                 + (f", picture scenes grown over {picture_curriculum} mixed rows"
                    if picture_curriculum != CURRICULUM_EXAMPLES else "")
                 + (f", {sum_stage} sums in the sum stage" if sum_stage != SUM_STAGE else "")
                 + (f", the learning rate's opening stretched {stretch:.3g}x (+{added_steps} steps)"
                    if added_steps else "")
                 + (f", the schedule of {schedule_steps} steps, its part after the first {opening_steps} stretched "
                    f"{mix_stretch:.3g}x" if mix_stretch > 1 else "")
                 + (f", {binding_stage} {question_shares(binding_questions)} questions among the sum stage's sums"
                    if binding_stage else "")
                 + (f", the first stage's {question_shares(binding_questions)} questions about the world's scenes"
                    if grown_first_stage else "")
                 + (" through the tower" if grown_first_stage and tower_first_stage else "")]
    progress = progress and writer

    def say(line):
        if writer:
            print(line, file=sys.stderr, flush=True)

    def log(line):
        log_lines.append(line)
        say(line)

    def write_log():
        if writer:
            (partial / "training_log.txt").write_text("\n".join(log_lines) + "\n")

    say(log_lines[0])

    if vision_weights:
        try:
            model.model.visual.load_weights(str(vision_weights))
        except (ValueError, RuntimeError) as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise ValueError(f"--vision-weights {vision_weights} is not a vision tower of this model: {error}") from None
        log(f"# vision tower loaded from {vision_weights} (pretrained beforehand, not in this run's time)")
    elif vision_steps:
        pretrain_vision(model.model.visual, processor, vision_steps, seed=seed, log=log, max_shapes=VISION_MAX_SHAPES,
                        pictures=vision_pictures, videos=vision_clips, motion_weight=vision_motion)

    train_config = TrainConfig(steps=steps, learning_rate=learning_rate, moe_aux_weight=0.01, mtp_weight=0.3,
                               seed=seed, progress=False, grad_clip=1.0, weight_decay=0.01,
                               experts=experts, workers=workers)
    trainer = Trainer(model, None, train_config)

    def schedule_for(peak):
        base = warmup_cosine(peak, warmup, schedule_steps - added_steps, start=peak * 5e-4, final=peak * 0.05)
        stretched = stretched_after_opening(stretched_opening(base, OPENING_STEPS, stretch), opening_steps, mix_stretch)
        if late_rate is None:
            return lambda step: stretched(mx.minimum(step, steps))  # settling steps keep the final rate
        late = late_rate * peak / learning_rate  # steps counted as the log counts them, as for the whole schedule
        return lambda step: mx.where((step > steps) & (step <= steps + 2 * late_stages + late_count_stage), late,
                                     stretched(mx.minimum(step, steps)))

    schedule = schedule_for(learning_rate)
    trainer.optimizer = tower_and_decoder_optimizer(schedule_for, learning_rate)
    means = None
    if scaffold_rows or grown_first_stage or binding_stage or side_stage:
        means = class_means(model.model.visual, processor, seed=seed + 5_000_101, position=scaffold_position)
        log("# binding scaffold: picture rows read the tower's class means"
            + (" in the binding stage," if binding_stage else "")
            + (" in the first stage and" if grown_first_stage and not tower_first_stage else "")
            + f" for the first {scaffold_rows} rows of the mixed stage")
    batches = length_batches(world_rows(seed, processor, means, scaffold_rows, picture_curriculum=picture_curriculum,
                                        grown_first_stage=grown_first_stage, binding_stage=binding_stage,
                                        tower_first_stage=tower_first_stage, binding_questions=binding_questions,
                                        sum_stage=sum_stage, side_stage=side_stage,
                                        left_right_stage=left_right_stage,
                                        mix=dict(TRAIN_MIX, count=count_rows) if count_rows else TRAIN_MIX),
                             tokens_per_batch, seed=seed)
    probes = probe_rows(seed, processor) if probe_every else {}
    left_right_from, count_from = steps + late_stages + 1, steps + 2 * late_stages + 1
    settle_from = count_from + late_count_stage
    settle_mix = dict(SETTLE_MIX, left_right=settle_left_right) if settle_left_right else SETTLE_MIX
    last = settle_from - 1 + settle_steps
    bar = _bar(last, progress)
    start, tokens, window = time.perf_counter(), 0, []

    def late_batches(rows):  # a late stage's rows, the image conversations among them
        return length_batches(interleaved(rows, conversations, late_images) if late_images else rows,
                              tokens_per_batch, seed=seed)

    def full_grown_stream(seed_offset, mix):
        return length_batches(grown_rows(seed + seed_offset, processor, mix), tokens_per_batch, seed=seed)

    for step in range(1, last + 1):
        if step == settle_from:
            batches = full_grown_stream(SETTLE_SEED, settle_mix)
        elif step == steps + 1:  # the late stages, their scaffold the tower's class means as it is now
            late_means = class_means(model.model.visual, processor, seed=seed + 5_000_101, position=True)
            conversations = grown_rows(seed + LATE_STAGES_SEED + 4, processor, {"image": 1.0})
            batches = late_batches(question_rows(seed + LATE_STAGES_SEED, processor, ask_side, late_means))
        elif step == left_right_from:
            batches = late_batches(question_rows(seed + LATE_STAGES_SEED + 2, processor, world.ask_left_right))
        elif step == count_from:
            batches = late_batches(grown_rows(seed + LATE_STAGES_SEED + 6, processor, {"count": 1.0}))
        elif step == steps - tool_tail + 1:
            batches = full_grown_stream(TOOL_TAIL_SEED, TOOL_TAIL_MIX)
        record = trainer.train_step(next(batches))
        tokens += record["tokens"]
        window.append(record)
        if step % log_every == 0 or step == last:
            elapsed = time.perf_counter() - start
            finite = [r for r in window if not r.get("skipped")]
            mean = {k: sum(r[k] for r in finite) / len(finite) for k in ("loss", "ce", "aux", "mtp")
                    if finite and k in finite[0]}
            skipped = f"  skipped {len(window) - len(finite)}" if len(finite) < len(window) else ""
            line = (f"step {step:5d}  " + "  ".join(f"{k} {v:.4f}" for k, v in mean.items()) + skipped
                    + f"  lr {float(schedule(step)):.2e}  tokens {tokens}  {tokens / elapsed:.0f} tok/s  "
                    f"elapsed {elapsed / 60:.1f} min")
            parallel.check_in_step(model.parameters(), f"weights at step {step}")
            if probe_every and (step % probe_every == 0 or step == last):
                model.eval()
                scores = held_out_scores(teacher_forced(model), probes, workers)
                line += "\n  held-out answers right: " + "  ".join(f"{k} {v:.0%}" for k, v in scores.items())
                if writer:  # a run cut short keeps its latest weights
                    save_weights(model, partial / "model.safetensors")
            log_lines.append(line)
            window = []
            if bar is None:
                say(line)
            write_log()
        if bar is not None:
            bar.set_postfix_str(f"loss {record['loss']:.3f} | {tokens / (time.perf_counter() - start):.0f} tok/s")
            bar.update(1)
    if bar is not None:
        bar.close()
    log_lines.append(f"# finished in {(time.perf_counter() - start) / 60:.1f} min, {tokens} tokens; "
                     f"{(time.perf_counter() - run_start) / 60:.1f} min in all (setup and the tower's pretraining "
                     f"included)")
    if not writer:
        shutil.rmtree(partial, ignore_errors=True)
        return output
    write_log()
    save_weights(model, partial / "model.safetensors")
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    return output


def tower_and_decoder_optimizer(schedule_for, peak: float, tower_scale: float = VISION_LR_SCALE):
    """AdamW with ADAM_BETAS for the decoder at `schedule_for(peak)` and for the vision tower at
    `schedule_for(peak * tower_scale)`, so the decoder's first, noisy gradients do not wash the tower out."""
    import mlx.optimizers as optim

    return optim.MultiOptimizer(
        [optim.AdamW(learning_rate=schedule_for(peak * tower_scale), betas=ADAM_BETAS, weight_decay=0.01),
         optim.AdamW(learning_rate=schedule_for(peak), betas=ADAM_BETAS, weight_decay=0.01)],
        [lambda path, _: path.startswith("model.visual")])


def save_weights(model, file: Path):
    """bfloat16 tensors (float32 for norms and DeltaNet decay parameters, as loading keeps them)."""
    from ..loading import FLOAT32_SUFFIXES

    weights = {k: v.astype(mx.float32 if k.endswith(FLOAT32_SUFFIXES) else mx.bfloat16)
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})


def _bar(total, enabled):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train-default", dynamic_ncols=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-qwen35 train-default", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(SHIPPED_PATH), help="where the model goes (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--vision-steps", type=int, default=VISION_PRETRAIN_STEPS,
                        help="steps of vision tower pretraining on the world's labels before the decoder trains")
    parser.add_argument("--vision-weights", help="start from this pretrained tower (safetensors) instead of "
                        "pretraining it again")
    parser.add_argument("--scaffold-rows", type=int, default=SCAFFOLD_ROWS,
                        help="rows of the mixed stage whose pictures read the binding scaffold (0: none)")
    parser.add_argument("--picture-curriculum", type=int, default=PICTURE_CURRICULUM,
                        help="mixed rows over which single-picture scenes grow to the world's (0: grown at once)")
    parser.add_argument("--grown-first-stage", action=argparse.BooleanOptionalAction, default=GROWN_FIRST_STAGE,
                        help="the first stage asks its colour questions about the world's scenes, read through the "
                        "binding scaffold, instead of about one large shape through the tower")
    parser.add_argument("--binding-stage", type=int, default=BINDING_STAGE,
                        help="questions about the world's scenes (--binding-questions), read through the binding "
                        "scaffold, shuffled among the sum stage's sums (0: none)")
    parser.add_argument("--binding-questions", nargs="+", choices=SCAFFOLD_QUESTIONS, default=BINDING_QUESTIONS,
                        help="what the binding stage and the grown first stage ask, one drawn at random a row "
                        "(a name given twice is drawn twice as often; counting: the counting rows, each count 0-4 "
                        "equally often; side: \"Is the {color} {shape} on the left or the right?\", best with "
                        "--scaffold-position)")
    parser.add_argument("--sum-stage", type=int, default=SUM_STAGE,
                        help="sums that open the curriculum, the binding stage's questions shuffled among them")
    parser.add_argument("--stretch-opening", action="store_true",
                        help="an opening longer than run 31's runs through the same part of the learning-rate "
                        "schedule, more slowly, so later steps see run 31's rates; --steps must add its steps")
    parser.add_argument("--schedule-steps", type=int,
                        help="the learning-rate schedule of a run of this many steps; the steps after the opening "
                        "pass through its remainder more slowly to fill --steps (default: "
                        f"{SCHEDULE_STEPS} for {STEPS} steps, else --steps)")
    parser.add_argument("--tower-first-stage", action=argparse.BooleanOptionalAction, default=TOWER_FIRST_STAGE,
                        help="with --grown-first-stage, the first stage's scenes read the tower, not the scaffold")
    parser.add_argument("--city-words", action=argparse.BooleanOptionalAction, default=CITY_WORDS,
                        help="the world tokenizer splits city names off their leading space (CITY_WORDS)")
    parser.add_argument("--city-pieces", action=argparse.BooleanOptionalAction, default=CITY_PIECES,
                        help="with --city-words, the questions' cities in pieces of other words, so every tool call "
                        "translates them (CITY_PIECES)")
    parser.add_argument("--tool-tail", type=int, help="the last steps draw a tool-heavy mix (TOOL_TAIL_MIX; 0: none; "
                        f"default: {TOOL_TAIL_STEPS} of {STEPS} steps, in proportion)")
    parser.add_argument("--count-rows", type=float, default=COUNT_ROWS, help="the mixed stage's weight of counting "
                        "rows (each count 0-4 equally often) beside TRAIN_MIX's (COUNT_ROWS; 0: none)")
    parser.add_argument("--vision-motion", type=float, default=VISION_MOTION_WEIGHT, help="the tower pretraining "
                        "also reads which way each clip's shapes move, at this loss weight (VISION_MOTION_WEIGHT; "
                        "0: not)")
    parser.add_argument("--vision-pictures", type=int, default=VISION_PICTURES,
                        help="world pictures in each tower pretraining batch (VISION_PICTURES)")
    parser.add_argument("--vision-clips", type=int, default=VISION_CLIPS,
                        help="clips in each tower pretraining batch (VISION_CLIPS)")
    parser.add_argument("--scaffold-position", action=argparse.BooleanOptionalAction, default=SCAFFOLD_POSITION,
                        help="the binding scaffold's centre tokens also carry their place across and down, along "
                        "the tower's directions for it (SCAFFOLD_POSITION; what the side question needs)")
    parser.add_argument("--side-stage", type=int, default=SIDE_STAGE, help="after the opening, this many "
                        "\"Is the {color} {shape} on the left or the right?\" rows alone, read through the scaffold "
                        "(SIDE_STAGE; needs --scaffold-position)")
    parser.add_argument("--left-right-stage", type=int, default=LEFT_RIGHT_STAGE, help="then this many of the "
                        "world's left/right questions alone, read through the tower (LEFT_RIGHT_STAGE)")
    parser.add_argument("--late-stages", type=int, default=LATE_STAGES, help="after --steps, at the final learning "
                        "rate, this many steps of side questions on the scaffold, then as many of left/right "
                        "questions through the tower, before the settling steps (LATE_STAGES; needs "
                        "--scaffold-position)")
    parser.add_argument("--late-count-stage", type=int, default=LATE_COUNT_STAGE, help="then this many steps of "
                        "counting rows (each count 0-4 equally often) through the tower, at the late stages' rate "
                        "(LATE_COUNT_STAGE; needs --late-stages)")
    parser.add_argument("--late-rate", type=float, help="the decoder's learning rate in the late stages (default: "
                        "the schedule's final rate)")
    parser.add_argument("--late-images", type=float, default=LATE_IMAGES, help="this share of the late stages' "
                        "rows are the mixed stage's image conversations, through the tower (LATE_IMAGES)")
    parser.add_argument("--settle-left-right", type=float, default=SETTLE_LEFT_RIGHT, help="the settling mix's "
                        "weight of lone left/right questions beside SETTLE_MIX's (SETTLE_LEFT_RIGHT)")
    parser.add_argument("--experts", choices=EXPERT_PATHS, default=EXPERTS,
                        help="how the routed experts run in training (EXPERTS): the same sums in another order; "
                        "segmented is the fastest on a CPU")
    parser.add_argument("--workers", type=int, default=WORKERS, help="each step's rows in this many parts, "
                        "each part's loss and gradients in a process of its own (WORKERS)")
    parser.add_argument("--settle", type=int, default=SETTLE_STEPS, help="steps added after --steps at the "
                        "schedule's final learning rate, drawing a video-heavy mix (SETTLE_MIX; 0: none)")
    args = parser.parse_args(argv)
    if args.vision_weights and not Path(args.vision_weights).is_file():
        parser.error(f"--vision-weights: no such file {args.vision_weights}")
    from .. import platform  # noqa: F401  (OpenBLAS before MLX runs anything)

    try:
        train_default(Path(args.output), seed=args.seed, steps=args.steps, tokens_per_batch=args.tokens_per_batch,
                      learning_rate=args.learning_rate, vision_steps=args.vision_steps,
                      vision_weights=args.vision_weights, scaffold_rows=args.scaffold_rows,
                      city_words=args.city_words, city_pieces=args.city_pieces, tool_tail=args.tool_tail,
                      picture_curriculum=args.picture_curriculum,
                      grown_first_stage=args.grown_first_stage, binding_stage=args.binding_stage,
                      tower_first_stage=args.tower_first_stage, binding_questions=tuple(args.binding_questions),
                      sum_stage=args.sum_stage, stretch_opening=args.stretch_opening,
                      schedule_steps=args.schedule_steps, settle_steps=args.settle, count_rows=args.count_rows,
                      vision_motion=args.vision_motion, vision_pictures=args.vision_pictures,
                      vision_clips=args.vision_clips, scaffold_position=args.scaffold_position,
                      side_stage=args.side_stage, left_right_stage=args.left_right_stage,
                      late_stages=args.late_stages, late_count_stage=args.late_count_stage,
                      settle_left_right=args.settle_left_right, late_rate=args.late_rate,
                      late_images=args.late_images, experts=args.experts,
                      workers=args.workers)
    except RecipeError as error:
        parser.error(error.flags())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
