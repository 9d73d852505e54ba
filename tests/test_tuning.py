"""--mode=tune: keras-tuner trials scored by validation robustness under a sparsity floor."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from anp_vs_tf import tuning

REPO = pathlib.Path(__file__).resolve().parents[1]
# 600 training examples (300 more held out for scoring), one epoch of PGD-2 per trial.
TUNE = [
    "--mode=tune", "--tuner=random", "--train_subset=600", "--validation_examples=300", "--epochs=1",
    "--batch_size=100", "--pgd_steps=2", "--step_size=0.1", "--min_sparsity=1", "--verbose=0",
]


def run_cli(*args, data_dir, cwd):
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "anp_vs_tf.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _Masked:
    def __init__(self, sparsity):
        self.value = sparsity

    def sparsity(self):
        return self.value


@pytest.mark.parametrize("robust, sparsity, score", [
    (0.40, 30.0, 0.40),   # meets the floor: the robust accuracy itself
    (0.95, 10.0, -0.05),  # under it: below every trial that meets it, however robust
    (0.00, 20.0, 0.00),
])
def test_a_trial_under_the_sparsity_floor_scores_below_every_one_that_meets_it(robust, sparsity, score):
    callback = tuning.SparsityConstrainedScore(min_sparsity=20.0)
    callback.set_model(_Masked(sparsity))
    logs = {"val_acc_adv": robust}
    callback.on_epoch_end(0, logs)
    assert logs["val_score"] == pytest.approx(score) and logs["val_sparsity"] == sparsity


def test_searched_settings_follow_the_method():
    assert [s[0] for s in tuning.searched_settings("anp_vs")] == [
        "lambda_vs", "beta_kl", "mask_lr", "mask_a_init", "mask_b_init", "adv_weight"]
    assert [s[0] for s in tuning.searched_settings("at_vs")] == ["lambda_vs", "adv_weight"]


def test_three_trials_resume_after_two_and_the_best_flagfile_trains(tmp_path, data_dir):
    out = tmp_path / "search"
    first = run_cli(*TUNE, "--max_trials=2", f"--out_dir={out}", data_dir=data_dir, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_rows(out / "tuning.csv")
    assert len(before) == 2

    # The same search asked for one more trial: keras-tuner resumes its own files.
    second = run_cli(*TUNE, "--max_trials=3", f"--out_dir={out}", data_dir=data_dir, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = read_rows(out / "tuning.csv")
    assert len(rows) == 3 and rows[:2] == before
    assert all(r["status"] == "COMPLETED" for r in rows)
    for row in rows:
        assert 1e-4 <= float(row["lambda_vs"]) <= 1.0 and 0.5 <= float(row["adv_weight"]) <= 4.0
        robust, sparsity, score = (float(row[k]) for k in ("val_acc_adv", "val_sparsity", "val_score"))
        assert 0.0 <= robust <= 1.0
        assert score == pytest.approx(robust if sparsity >= 1.0 else robust - 1.0, abs=1e-6)
    # Trials can tie on 600 images (same robust accuracy, both short of the sparsity goal);
    # keras-tuner then picks any of them, so the flagfile must hold one of the best.
    top = max(float(r["val_score"]) for r in rows)
    best = [r for r in rows if float(r["val_score"]) == top]

    flagfile = (out / "best.cfg").read_text()
    assert any(f"--lambda_vs={r['lambda_vs']}" in flagfile for r in best), (best, flagfile)
    assert "--validation_examples=0" in flagfile and "--max_trials" not in flagfile
    trained = run_cli(f"--flagfile={out / 'best.cfg'}", f"--out_dir={tmp_path / 'best'}", "--test_subset=100",
                      "--eval_pgd_steps=2", "--sanity_examples=0", "--plots=false",
                      data_dir=data_dir, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "best" / "metrics.json").exists()


def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path, data_dir, monkeypatch):
    from anp_vs_tf import data
    from anp_vs_tf.config import RunConfig

    config = RunConfig(mode="tune", train_subset=300, validation_examples=200, epochs=1, batch_size=100,
                       pgd_steps=1, step_size=0.3, max_trials=3, verbose=0, out_dir=str(tmp_path),
                       data_dir=str(data_dir), download=False).resolved()
    splits = data.load("mnist", data_dir=data_dir, batch_size=100, train_subset=300,
                       validation_examples=200, test_subset=100, download=False)
    fits = []
    real_fit = tuning.AnpVsHyperModel.fit

    def second_trial_fails(self, hp, model, *args, **kwargs):
        fits.append(1)
        if len(fits) == 2:
            raise ValueError("this trial's settings cannot train")
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(tuning.AnpVsHyperModel, "fit", second_trial_fails)
    rows = tuning.run_tune(config, splits, str(tmp_path))
    assert [r["status"] for r in rows] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert read_rows(tmp_path / "tuning.csv")[1]["status"] == "FAILED"
    assert (tmp_path / "best.cfg").exists()
