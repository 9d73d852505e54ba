"""The README's quickstart end to end.

`test_quickstart_shortened_end_to_end` runs in every CI run (about a minute on 2 cores):
the README's command, `python -m anp_vs_tf.main --flagfile=configs/quickstart.cfg`,
with smaller epochs and subsets appended (absl: later flags win), then `--mode=export`
on the model it saved. Every stage the full quickstart goes through runs (base model,
ANP-VS from it, evaluation with PGD-40, FGSM and the gradient-masking checks, every
figure, export), in fresh processes with the user's kernel set (oneDNN as the shell
has it), so an abort anywhere in the pipeline fails CI.

`test_quickstart_meets_the_issue_targets` is the full run against issue 23's targets
(slow: 7 to 20 minutes on 2 cores; run with -m slow).
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = [sys.executable, "-m", "anp_vs_tf.main", "--flagfile=configs/quickstart.cfg"]

# The shortened quickstart: what comes after the flagfile overrides it.
TRAIN_SUBSET, TEST_SUBSET, SANITY_EXAMPLES, PRETRAIN_EPOCHS, EPOCHS = 4000, 1000, 200, 1, 2
SHORTENED = [
    f"--pretrain_epochs={PRETRAIN_EPOCHS}",
    f"--epochs={EPOCHS}",
    f"--train_subset={TRAIN_SUBSET}",  # class-balanced
    f"--test_subset={TEST_SUBSET}",
    "--eval_batch_size=500",  # two evaluation batches; the figures use the first
    f"--sanity_examples={SANITY_EXAMPLES}",
]  # evaluation keeps the quickstart's PGD-40 (step 0.01, eps 0.3)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_FIGURES = ("feature_vulnerability.png", "loss_surface.png", "saliency.png")
ANP_VS_FIGURES = ("pruning.png", "active_units.png") + BASE_FIGURES


def output_tail(stream, chars):
    """The end of a process's output, without faulthandler's one-line list of extension modules."""
    text = stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""
    return "\n".join(line[:500] for line in text.splitlines() if not line.startswith("Extension modules:"))[-chars:]


def fatal_lines(stderr):
    """TensorFlow's fatal log lines (F0000 ... Check failed ...) and Python's, which an abort prints."""
    return [line[:500] for line in (stderr or "").splitlines()
            if re.match(r"F\d{4} ", line) or "Check failed" in line or line.startswith("Fatal Python error")]


def run_cli(args, timeout, env):
    """Run the CLI in a subprocess; fail with the output's tail if it times out or fails."""
    command = " ".join(args[1:])
    start = time.time()
    try:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{command} did not finish in {timeout} s.\n--- stdout tail:\n{output_tail(error.stdout, 2000)}"
                    f"\n--- stderr tail:\n{output_tail(error.stderr, 5000)}", pytrace=False)
    wall = time.time() - start
    if done.returncode != 0:
        how = (f"was killed by signal {-done.returncode}" + (" (SIGABRT: an abort)" if done.returncode == -6 else "")
               if done.returncode < 0 else f"exited with status {done.returncode}")
        fatal = "".join(f"\n    {line}" for line in fatal_lines(done.stderr))
        pytest.fail(f"{command} {how} after {wall:.0f} s." + (f"\n--- fatal errors:{fatal}" if fatal else "")
                    + f"\n--- stdout tail:\n{output_tail(done.stdout, 2000)}"
                    f"\n--- stderr tail:\n{output_tail(done.stderr, 5000)}", pytrace=False)
    return done, wall


def check_png(path):
    assert path.is_file(), f"figure {path} was not written"
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    assert width >= 200 and height >= 150 and len(raw) > 5000, (
        f"{path}: a {width}x{height} PNG of {len(raw)} bytes is too small to be a figure")
    import matplotlib.image

    pixels = matplotlib.image.imread(path)  # the whole file decodes
    assert pixels.shape[:2] == (height, width) and pixels[..., :3].std() > 0.01, f"{path} is blank"


def check_metrics(metrics, method, epochs, where):
    for key in ("clean_acc", "pgd_acc", "fgsm_acc", "num_examples", "eval_attack", "vulnerability_wb",
                "layer_vulnerability_wb", "sanity", "sparsity_pct", "flops_speedup", "n_active",
                "method", "epochs", "wall_time_s"):
        assert key in metrics, f"{where}: no {key!r} in metrics.json"
    assert metrics["method"] == method and metrics["epochs"] == epochs, where
    assert metrics["num_examples"] == TEST_SUBSET, where
    assert metrics["sanity"]["examples"] == SANITY_EXAMPLES, where
    attack = metrics["eval_attack"]
    assert (attack["name"], attack["steps"], attack["eps"], attack["step_size"]) == ("PGD", 40, 0.3, 0.01), where
    assert metrics["clean_acc"] > 0.5, f"{where}: clean accuracy {metrics['clean_acc']:.3f}"
    assert 0 <= metrics["pgd_acc"] < metrics["clean_acc"], where
    assert 0 <= metrics["fgsm_acc"] <= 1 and 0 < metrics["vulnerability_wb"] < 10, where
    assert 0 <= metrics["sparsity_pct"] < 100 and metrics["flops_speedup"] >= 1, where


def test_quickstart_shortened_end_to_end(tmp_path, data_dir):
    out = tmp_path / "quickstart"
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir)}  # the kernels are the shell's (oneDNN on)
    done, _ = run_cli(QUICKSTART + SHORTENED + [f"--out_dir={out}"], timeout=900, env=env)

    # The result table, both runs' metrics, every figure.
    assert "| Standard (base) |" in done.stdout and "| ANP-VS |" in done.stdout, done.stdout[-2000:]
    base = json.loads((out / "base" / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    check_metrics(base, "standard", PRETRAIN_EPOCHS, "base")
    check_metrics(metrics, "anp_vs", EPOCHS, "ANP-VS")
    assert base["pruning"] == "none" and metrics["pruning"] == "units"
    assert metrics["n_active"] and set(metrics["n_active"]) == set(metrics["n_units"])
    assert all(0 < metrics["n_active"][k] <= metrics["n_units"][k] for k in metrics["n_units"])
    # The quickstart's budgets hold even in the shortened run (the freeze enforces them).
    assert metrics["target_flops_speedup"] == 4.0 and metrics["target_memory_pct"] == 15.0
    assert metrics["target_met"] is True
    assert metrics["flops_speedup"] >= 4.0 and metrics["memory_pct"] <= 15.0
    assert (out / "base" / "model.keras").is_file() and (out / "model.keras").is_file()
    for name in BASE_FIGURES:
        check_png(out / "base" / "plots" / name)
    for name in ANP_VS_FIGURES:
        check_png(out / "plots" / name)

    # Export the run's model, as the README's next step does.
    export_dir = tmp_path / "export"
    run_cli([sys.executable, "-m", "anp_vs_tf.main", "--mode=export", f"--model_path={out / 'model.keras'}",
             f"--export_dir={export_dir}", "--version=1"], timeout=300, env=env)
    version = export_dir / "1"
    for name in ("saved_model.pb", "variables", "compact.keras", "export.json"):
        assert (version / name).exists(), f"export wrote no {name}"
    report = json.loads((version / "export.json").read_text())
    assert report["method"] == "anp_vs" and report["model"] == "lenet5_caffe"
    assert report["signature"]["inputs"]["images"]["shape"] == [None, 28, 28, 1]

    # The SavedModel serves the run's model: same predictions on test images.
    import numpy as np
    import tensorflow as tf

    from anp_vs_tf.data import load_arrays
    from anp_vs_tf.trainers import load_robust_model

    images, labels, _ = load_arrays("mnist", "test", data_dir=data_dir, download=False)
    x, y = images[:64].astype("float32") / 255.0, np.asarray(labels[:64])
    served = tf.saved_model.load(str(version)).signatures["serving_default"](images=tf.constant(x))
    expected = load_robust_model(str(out / "model.keras")).inference_logits(x).numpy()
    logits = served["logits"].numpy()
    assert logits.shape == (64, 10)
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert np.abs(logits - expected).max() <= 1e-3
    assert (logits.argmax(1) == y).mean() > 0.5


@pytest.mark.slow
def test_quickstart_meets_the_issue_targets(tmp_path, data_dir):
    out = tmp_path / "quickstart"
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "anp_vs_tf.main", "--flagfile=configs/quickstart.cfg", f"--out_dir={out}"],
        cwd=REPO, env={**os.environ, "ANP_VS_DATA_DIR": str(data_dir)},
        capture_output=True, text=True, timeout=1200,
    )
    wall = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    base = json.loads((out / "base" / "metrics.json").read_text())
    assert metrics["num_examples"] == 10_000 and metrics["eval_attack"]["steps"] == 40
    # Issue 23's targets.
    assert metrics["flops_speedup"] >= 4.0 and metrics["memory_pct"] <= 15.0 and metrics["target_met"]
    assert metrics["vulnerability_wb"] < base["vulnerability_wb"]
    assert metrics["clean_acc"] >= 0.985
    assert metrics["pgd_acc"] >= 0.88
    assert metrics["sparsity_pct"] >= 60
    assert wall < 600, f"quickstart took {wall:.0f} s (issue 23: 10 minutes on 2 cores)"
