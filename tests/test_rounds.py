"""Iterated DRIFT's rounds in run_dir: where each round lives, which an earlier run left beyond this one's,
and what a refusal tells to remove (no Ray; a real two-round job is in test_pipeline.py)."""

from pathlib import Path

import pytest

from drift_ray.config import load_config
from drift_ray.pipeline import (
    TRAIN_DIR,
    check_later_rounds_before_the_models,
    later_round_remedy,
    round_config,
    rounds_beyond,
)
from drift_ray.train import MODEL_DIR, STATS_FILE


def config(run_dir: Path, rounds: int):
    return load_config(None, [f"run_dir={run_dir}", f"rounds={rounds}", "seed=7", f"rollout.output_dir={run_dir}-rollouts"])


def finish_model(run_dir: Path) -> None:
    model = run_dir / TRAIN_DIR / MODEL_DIR
    model.mkdir(parents=True)
    (model / STATS_FILE).write_text("{}")


def test_a_later_round_has_its_own_run_dir_rollouts_and_seed(tmp_path):
    cfg = config(tmp_path / "run", rounds=3)
    assert round_config(cfg, 1) is cfg
    third = round_config(cfg, 3)
    assert (third.run_dir, third.rollout.output_dir, third.seed) == (str(tmp_path / "run" / "round-3"), None, 9)
    assert (cfg.run_dir, cfg.seed) == (str(tmp_path / "run"), 7)  # a copy: round 1's config unchanged


def test_rounds_beyond_are_the_numbered_round_directories_after_the_last(tmp_path):
    for name in ("round-2", "round-3", "round-10", "round-x", "rounds-4"):
        (tmp_path / name).mkdir()
    assert rounds_beyond(tmp_path, 2) == [3, 10]
    assert rounds_beyond(tmp_path, 10) == []


def test_the_remedy_for_a_later_round_names_it_and_every_round_after_it_present(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, rounds=3)
    for r in (2, 3, 4):  # round 4: an earlier run's, with more rounds
        (run_dir / f"round-{r}").mkdir(parents=True)
    assert later_round_remedy(cfg, 3) == (
        f"Rerun with the same config, or remove {run_dir / 'round-3'}, {run_dir / 'round-4'} to play round 3 and the "
        "rounds after it again (each builds on the model of the round before), or use a new run_dir."
    )
    # A round not yet written is named all the same: the one the refused stage belongs to.
    assert f"remove {tmp_path / 'new' / 'round-2'} to play round 2" in later_round_remedy(config(tmp_path / "new", 2), 2)


def test_a_model_to_train_anew_below_later_rounds_is_refused_before_any_stage(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, rounds=3)
    (run_dir / "round-3").mkdir(parents=True)
    finish_model(run_dir)  # round 1 finished; round 2's model is not, and round 3 was played from the old one
    with pytest.raises(RuntimeError) as refused:
        check_later_rounds_before_the_models(cfg)
    assert str(refused.value).startswith(
        f"{run_dir / 'round-2' / TRAIN_DIR}: round 2's model is to be trained anew, and {run_dir} holds round(s) 3 "
        f"built on the model it replaces: remove {run_dir / 'round-3'} to play round 3"
    )
    finish_model(run_dir / "round-2")
    check_later_rounds_before_the_models(cfg)
    # Rounds past this run's are not played by it: nothing of theirs is built on a model it trains.
    check_later_rounds_before_the_models(config(run_dir, rounds=2))
    check_later_rounds_before_the_models(config(tmp_path / "empty", rounds=3))
