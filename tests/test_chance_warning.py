"""A masked method on random weights says so before any work, and a run that ends at
chance accuracy says so in one line (issue 23: no silent failure)."""

import json
import os
import subprocess
import sys

import pytest

from anp_vs_tf.experiment import at_chance


def test_at_chance_is_within_two_points_of_guessing():
    assert at_chance(0.10, 10) and at_chance(0.119, 10)
    assert not at_chance(0.13, 10) and not at_chance(0.98, 10)
    assert at_chance(0.02, 100) and not at_chance(0.05, 100)


@pytest.fixture(scope="module")
def from_scratch(tmp_path_factory, data_dir):
    """BP (masks, no attack: the cheapest masked method) from random weights, briefly."""
    out = tmp_path_factory.mktemp("scratch") / "run"
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "anp_vs_tf.main", "--method=bp", "--epochs=1", "--train_subset=600",
         "--test_subset=200", "--batch_size=100", "--eval_pgd_steps=1", "--sanity_examples=0",
         "--noplots", "--nofgsm", "--verbose=2", f"--out_dir={out}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # one stream, in the order it was written
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout.splitlines(), json.loads((out / "metrics.json").read_text())


def test_random_weights_are_named_before_the_work(from_scratch):
    lines, _ = from_scratch
    warnings = [i for i, l in enumerate(lines) if l.startswith("anp_vs_tf: warning:")]
    first = lines[warnings[0]]
    assert "--method=bp learns its masks on random weights" in first
    assert "--init_from" in first and "--pretrain_epochs" in first
    # before any work: ahead of the epoch's progress line ("6/6 - ... - acc: ...")
    progress = next(i for i, l in enumerate(lines) if l.startswith("6/6 - "))
    assert warnings[0] < progress


def test_a_run_at_chance_says_so_in_one_line(from_scratch):
    output, metrics = from_scratch
    lines = [l for l in output if "ended at chance accuracy" in l]
    if at_chance(metrics["clean_acc"], 10):
        assert len(lines) == 1 and lines[0].startswith("anp_vs_tf: warning: bp ended at chance accuracy")
        assert f"{100 * metrics['clean_acc']:.1f}% clean for 10 classes" in lines[0]
    else:
        assert lines == []
