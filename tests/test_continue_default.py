"""scripts/continue_default.py: late stages of the curriculum run on a trained model."""

import importlib.util
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

import mlx_qwen35
from mlx_qwen35.loading import DEFAULT_MODEL_PATH

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("continue_default", ROOT / "scripts" / "continue_default.py")
continue_default = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(continue_default)


def continued_log(tmp_path, *flags) -> str:
    """The training log of a short continuation of the shipped model (512-token steps, every step logged)."""
    output = tmp_path / "continued"
    assert continue_default.main(["--model", str(DEFAULT_MODEL_PATH), "--output", str(output),
                                  "--tokens-per-batch", "512", "--log-every", "1", *flags]) == 0
    return (output / "training_log.txt").read_text()


@pytest.mark.parametrize("args, named", [
    (["--side-stage", "-1"], "--side-stage -1"),
    (["--mix-steps", "-3"], "--mix-steps -3"),
    (["--count-stage", "-2"], "--count-stage -2: 0 or more"),
    (["--mix-count", "-0.5"], "--mix-count -0.5: a weight"),
    (["--stage-images", "1"], "--stage-images 1.0: a share"),
    (["--stage-images", "-0.1"], "--stage-images -0.1: a share"),
    (["--tower-scale", "-1"], "--tower-scale -1.0: a share of the decoder's rate"),
    (["--count-frozen-tower"], "--count-frozen-tower: only with --count-stage"),
    (["--model", "/no/such/model"], "--model /no/such/model"),
    (["--workers", "0"], "--workers 0: 1 or more"),
])
def test_bad_arguments_are_named_before_anything_is_written(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit):
        continue_default.main(["--output", str(tmp_path / "out"), *args])
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_model_being_continued_is_not_its_own_output(capsys):
    with pytest.raises(SystemExit):
        continue_default.main(["--output", str(DEFAULT_MODEL_PATH)])
    assert "--output: a new directory" in capsys.readouterr().err


def test_a_short_continuation_writes_a_loadable_model_with_new_weights_and_its_log(tmp_path):
    """Stages of 12 side and 12 left/right rows and 2 mixed steps from the shipped model: the output loads,
    its configs are the shipped ones, its decoder weights moved, and the log names the stages and the mix's start."""
    from mlx.utils import tree_flatten

    output = tmp_path / "continued"
    assert continue_default.main(["--model", str(DEFAULT_MODEL_PATH), "--output", str(output), "--side-stage", "12",
                                  "--left-right-stage", "12", "--mix-steps", "2", "--tokens-per-batch", "512",
                                  "--log-every", "1"]) == 0
    assert not (tmp_path / "continued.partial").exists()
    assert (output / "config.json").read_text() == (DEFAULT_MODEL_PATH / "config.json").read_text()
    log = (output / "training_log.txt").read_text()
    assert "12 side rows on the scaffold with places, 12 left/right rows through the tower" in log
    mixing_from = int(re.search(r"^step (\d+)  the stages' rows done", log, re.M).group(1))
    assert re.search(rf"^# finished: {mixing_from + 1} steps", log, re.M)  # the 2 mixed steps, that one the first
    shipped, _ = mlx_qwen35.load()
    continued, _ = mlx_qwen35.load(output)
    before, after = dict(tree_flatten(shipped.parameters())), dict(tree_flatten(continued.parameters()))
    assert before.keys() == after.keys()
    moved = [k for k in before if not np.array_equal(np.array(before[k]), np.array(after[k]))]
    assert any(k.startswith("language_model") or ".layers." in k for k in moved)


def test_the_stages_run_at_their_own_rate_and_the_mix_at_the_learning_rate(tmp_path):
    """--stage-rate 4e-4 with --learning-rate 1e-4: each logged step's decoder rate is the 20-step warm-up
    (from a twentieth of the rate) of the stages' rate while the stages' rows last, and of 1e-4 from the mix's
    first step on (the rate a step trains at is the schedule at the steps taken before it)."""
    log = continued_log(tmp_path, "--side-stage", "8", "--left-right-stage", "8", "--mix-steps", "2",
                        "--learning-rate", "1e-4", "--stage-rate", "4e-4")
    assert "learning rate 0.0001, in the stages 0.0004" in log
    mixing_from = int(re.search(r"^step (\d+)  the stages' rows done", log, re.M).group(1))
    rates = {int(s): float(r) for s, r in re.findall(r"^step +(\d+)  loss \S+  rows \d+  lr (\S+)", log, re.M)}
    assert sorted(rates) == list(range(1, mixing_from + 2))
    for step, logged in rates.items():
        peak = 4e-4 if step < mixing_from else 1e-4
        assert logged == pytest.approx(peak * (0.05 + 0.95 * (step - 1) / 20), rel=1e-2), step


@pytest.mark.parametrize("flags, share", [([], 0.1), (["--tower-scale", "1"], 1.0), (["--tower-scale", "0"], 0.0)])
def test_the_tower_trains_at_its_share_of_the_decoders_rate(tmp_path, flags, share):
    """Each logged step's tower rate is `share` of the decoder's (a tenth unless --tower-scale says), in the
    stages and in the mix, and the log's header says the share."""
    log = continued_log(tmp_path, "--side-stage", "4", "--left-right-stage", "4", "--mix-steps", "2",
                        "--stage-rate", "4e-4", *flags)
    assert f"(tower {share}x)" in log
    rates = re.findall(r"^step +\d+  loss \S+  rows \d+  lr (\S+)  tower (\S+)", log, re.M)
    assert len(rates) >= 3 and "the mix from here" in log
    for decoder, tower in rates:
        assert float(tower) == pytest.approx(share * float(decoder), rel=1e-2, abs=1e-12)


@pytest.mark.parametrize("rate", ["0", "-0.0001"])
def test_a_stage_rate_of_zero_or_less_is_refused_by_name(tmp_path, capsys, rate):
    with pytest.raises(SystemExit):
        continue_default.main(["--output", str(tmp_path / "out"), "--stage-rate", rate])
    assert f"--stage-rate {float(rate)}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_no_mix_steps_stops_where_the_stages_rows_end(tmp_path):
    """--mix-steps 0 after stages: every step trained is a stage's, none of the mix (the mix's first step is not
    run)."""
    log = continued_log(tmp_path, "--side-stage", "8", "--left-right-stage", "8", "--mix-steps", "0")
    assert "the mix from here" not in log
    steps = int(re.search(r"^# finished: (\d+) steps", log, re.M).group(1))
    assert steps >= 1 and [int(s) for s in re.findall(r"^step +(\d+)  loss", log, re.M)] == list(range(1, steps + 1))


@pytest.mark.parametrize("stages_rows, share", [(14400, 0.25), (10, 0.5), (7, 0.3)])
def test_conversations_join_the_stages_rows_at_their_share_and_leave_the_rest_alone(stages_rows, share):
    """The stages' own rows all come, in order, before any later row; the conversations among them are `share`
    of the stages' rows (to the nearest row), never two in a row while the share is at most a half, and the
    stages' new count is where the later rows start."""
    import itertools

    rows, conversations = iter(range(10 * stages_rows)), (f"c{i}" for i in itertools.count())
    mixed, count = continue_default.with_conversations(rows, conversations, stages_rows, share)
    stages = list(itertools.islice(mixed, count))
    own = [row for row in stages if isinstance(row, int)]
    added = [row for row in stages if isinstance(row, str)]
    assert own == list(range(stages_rows))
    assert added == [f"c{i}" for i in range(len(added))]
    assert abs(len(added) - share * count) <= 1
    assert not any(isinstance(a, str) and isinstance(b, str) for a, b in zip(stages, stages[1:]))
    assert next(mixed) == stages_rows


def test_a_continuation_with_conversations_in_its_stages_spends_them_before_the_mix(tmp_path):
    """--stage-images 0.5 with 6 side and 6 left/right rows: 12 conversations join the stages, so the mix starts
    only once a pool of rows past all 24 has been drawn, and the log says what the stages held."""
    from mlx_qwen35.train import default_model

    log = continued_log(tmp_path, "--side-stage", "6", "--left-right-stage", "6", "--stage-images", "0.5",
                        "--mix-steps", "1")
    assert "image conversations among them (50% of their rows)" in log
    drawn = int(re.search(r"the stages' rows done \((\d+) rows drawn\)", log).group(1))
    assert drawn >= 24 + default_model.BATCH_POOL


@pytest.mark.parametrize("flags, pictures", [([], "PREPROCESSOR"), (["--reading-size"], "READING_PREPROCESSOR")])
def test_training_pictures_are_encoded_at_their_size_or_enlarged_as_read(tmp_path, monkeypatch, flags, pictures):
    """The rows are encoded at the world's sizes, or with --reading-size as the shipped model reads pictures
    (READING_PREPROCESSOR, whose grids the default model's tests work out), and the log says which."""
    dm = continue_default.dm
    made = []
    real = dm.training_processor
    monkeypatch.setattr(dm, "training_processor", lambda tokenizer, config=dm.PREPROCESSOR:
                        made.append(config) or real(tokenizer, config))
    log = continued_log(tmp_path, "--side-stage", "0", "--left-right-stage", "0", "--mix-steps", "1", *flags)
    assert made == [getattr(dm, pictures)]
    assert ("pictures enlarged to 160 px a side as read" in log) == bool(flags)


def test_a_stage_joins_after_the_stages_before_it_and_the_rest_follows():
    stage = (f"count {i}" for i in itertools.count())
    assert list(continue_default.with_stage(iter(range(6)), stage, 2, 3)) == \
        [0, 1, "count 0", "count 1", "count 2", 2, 3, 4, 5]
    assert next(stage) == "count 3"  # no more of the stage drawn than it was given


def test_a_count_stage_alone_ends_where_its_rows_do(tmp_path):
    """--count-stage 10 and no other stage: the log names it, and with no mix steps the run stops once its rows
    (and the pool drawn with them) are spent."""
    log = continued_log(tmp_path, "--side-stage", "0", "--left-right-stage", "0", "--count-stage", "10",
                        "--mix-steps", "0")
    assert "0 left/right rows through the tower, 10 counting rows through the tower" in log
    assert re.search(r"^# finished: [1-9]\d* steps", log, re.M) and "the mix from here" not in log


@pytest.mark.parametrize("flags, left_right_drawn", [([], 24), (["--stage-images", "0.5"], 48)])
def test_a_frozen_tower_stays_still_through_the_count_stage_and_trains_again_in_the_mix(tmp_path, monkeypatch,
                                                                                        flags, left_right_drawn):
    """--count-frozen-tower after 24 left/right rows (48 rows drawn with as many conversations among them): the
    tower moves with every step until the log says it froze, which is only once a whole batch pool past those rows
    has been drawn; not at all from there to the mix (no trainable tower parameter, the same weights); and with
    every mixed step again."""
    from mlx.utils import tree_flatten

    steps = []
    train_step = continue_default.Trainer.train_step

    def tower(trainer):
        return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(trainer.model.model.visual.parameters())])

    def recorded(trainer, batch=None):
        before = tower(trainer)
        trainable = bool(tree_flatten(trainer.model.model.visual.trainable_parameters()))
        record = train_step(trainer, batch)
        steps.append((trainable, not np.array_equal(before, tower(trainer))))
        return record

    monkeypatch.setattr(continue_default.Trainer, "train_step", recorded)
    log = continued_log(tmp_path, "--side-stage", "0", "--left-right-stage", "24", "--count-stage", "160",
                        "--count-frozen-tower", "--mix-steps", "3", *flags)
    assert "160 counting rows through the tower (frozen)" in log
    frozen = re.search(r"^step (\d+)  the tower frozen for the count stage \((\d+) rows drawn\)", log, re.M)
    frozen_at = int(frozen.group(1))
    assert int(frozen.group(2)) >= left_right_drawn + continue_default.dm.BATCH_POOL
    again_at = int(re.search(r"^step (\d+)  the tower trains again", log, re.M).group(1))
    assert 1 < frozen_at < again_at == int(re.search(r"^step (\d+)  the stages' rows done", log, re.M).group(1))
    assert len(steps) == again_at + 2
    assert all(trainable and moved for trainable, moved in steps[:frozen_at - 1])
    assert not any(trainable or moved for trainable, moved in steps[frozen_at - 1:again_at - 1])
    assert all(trainable and moved for trainable, moved in steps[again_at - 1:])
