"""The platform policy and the thin CLI."""

import os
import sys

import mlx.core as mx
import pytest

from mlx_qwen35 import platform
from mlx_qwen35.cli import main
from mlx_qwen35.generation import generate_tokens
from mlx_qwen35.loading import load_model

OPENBLAS_PRESENT = any(os.path.exists(p) for p in platform.OPENBLAS_PATHS)


@pytest.mark.skipif(not (sys.platform == "linux" and OPENBLAS_PRESENT), reason="needs Linux with OpenBLAS")
def test_openblas_is_loaded_before_mlx():
    assert platform.blas_in_use().startswith("OpenBLAS")


def test_cpu_defaults_to_float32():
    if mx.default_device() == mx.cpu:
        assert platform.default_dtype() == mx.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        platform.parse_dtype("float8")


def test_info_reports_blas_and_model(capsys, tmp_path):
    from hf_reference import build_hf_model, save_hf_checkpoint

    path = save_hf_checkpoint(build_hf_model(moe=True, seed=2), tmp_path)
    main(["info", "--model", str(path)])
    out = capsys.readouterr().out
    assert "CPU:" in out and platform.cpu_setup() in out
    assert "qwen3_5_moe, 4 layers" in out and "experts: 8, 2 routed per token" in out


def test_generate_rejects_ids_outside_vocabulary(tmp_path):
    from hf_reference import build_hf_model, save_hf_checkpoint

    model = load_model(save_hf_checkpoint(build_hf_model(seed=4), tmp_path))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        next(generate_tokens(model, [1, 2, 9999]))


def test_generate_without_model_or_default_model_says_it_uses_random_weights(capsys, tmp_path, monkeypatch):
    from mlx_qwen35 import cli, demo, loading

    monkeypatch.setattr(loading, "DEFAULT_MODEL_PATH", tmp_path / "no-default-model")  # an install without it
    target = tmp_path / "random"
    monkeypatch.setattr(cli, "DEFAULT_PATH", target)
    monkeypatch.setattr(cli, "ensure_random_checkpoint", lambda: demo.ensure_random_checkpoint(target))
    main(["generate", "--prompt", "Hello", "--max-tokens", "4"])
    captured = capsys.readouterr()
    assert "RANDOM-weight" in captured.err
    assert "generated 4 tokens" in captured.err
    assert (target / "model.safetensors").exists() and not target.with_name("random.partial").exists()


def test_convert_subcommand_writes_a_loadable_model(tmp_path):
    import mlx.core as mx
    import numpy as np
    from hf_reference import build_hf_model, save_hf_checkpoint

    source = save_hf_checkpoint(build_hf_model(moe=True, seed=6), tmp_path / "src")
    main(["convert", str(source), str(tmp_path / "out"), "--dtype", "float32", "--quiet"])
    ids = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(load_model(tmp_path / "out")(ids)), np.array(load_model(source)(ids)))
    with pytest.raises(SystemExit):
        main(["convert", str(source), str(tmp_path / "out"), "--quiet"])  # exists, no --force


def test_convert_with_expert_store_streams_identical_logits(tmp_path):
    import mlx.core as mx
    import numpy as np
    from hf_reference import build_hf_model, save_hf_checkpoint

    import mlx_qwen35

    source = save_hf_checkpoint(build_hf_model(moe=True, seed=8), tmp_path / "src")
    main(["convert", str(source), str(tmp_path / "out"), "--dtype", "float32", "--expert-store", "--quiet"])
    assert (tmp_path / "out" / "expert_store" / "manifest.json").exists()
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    streamed, _ = mlx_qwen35.load(tmp_path / "out", expert_cache_gb=1e-4)
    resident = load_model(tmp_path / "out")
    np.testing.assert_array_equal(np.array(streamed(ids)), np.array(resident(ids)))
    assert streamed.expert_cache.summary()["overall"]["misses"] > 0


def test_generate_with_expert_cache_prints_its_stats(tmp_path, capsys):
    from hf_reference import build_hf_model, save_hf_checkpoint

    from mlx_qwen35.tokenizer import write_tokenizer_files

    path = save_hf_checkpoint(build_hf_model(moe=True, seed=9, vocab_size=248320), tmp_path)
    write_tokenizer_files(path)
    main(["generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "3"])
    resident = capsys.readouterr().out
    main(["generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "3", "--expert-cache-gb", "0.0001",
          "--stats"])
    captured = capsys.readouterr()
    assert captured.out == resident  # the cache changes speed, never tokens
    assert "expert cache: hit rate" in captured.err


@pytest.mark.parametrize("chunks, thinking, expected", [
    # reasoning, then the answer on its own line; "</think>" split across chunks never shows
    (["12 plus 3", "4 is 46.\n</", "think>\n\n", "46."], True, "12 plus 34 is 46.\n46.\n"),
    # an empty thinking block (what the default model writes for a picture question): the answer alone
    (["</think>", "\n\n", "green", "."], True, "green.\n"),
    # cut off while thinking: what was thought is still shown
    (["12 plus", " 34 is"], True, "12 plus 34 is\n"),
    # thinking off (or a raw prompt): every chunk as it came
    (["\n46", "."], False, "\n46.\n"),
])
def test_generate_prints_the_thinking_apart_from_the_answer(capsys, chunks, thinking, expected):
    from types import SimpleNamespace

    from mlx_qwen35.cli import print_stream

    last = print_stream((SimpleNamespace(text=chunk) for chunk in chunks), thinking=thinking)
    assert capsys.readouterr().out == expected and last.text == chunks[-1]


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("[{", "not valid JSON"),
                                              ('[{"type": "function"}]', "tool 0 has no name")])
def test_generate_refuses_a_bad_tools_file_by_name_before_loading(tmp_path, monkeypatch, content, message):
    from mlx_qwen35 import cli

    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded a model before reading --tools"))
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=f"--tools.*{message}"):
        main(["generate", "--tools", str(path), "--prompt", "Hi"])
