"""The command line: flagfiles, one-line errors before any work, and a short real run."""

import gzip
import json
import os
import shutil
import pathlib
import subprocess
import sys

import pytest

from anp_vs_tf import main
from anp_vs_tf.config import RunConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.cfg"))


def run_cli(*args, cwd, data_dir, timeout=600):
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "anp_vs_tf.main", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_flagfile_parses_into_a_valid_config(path):
    try:
        main.FLAGS(["anp_vs_tf", f"--flagfile={path}"])
        config = main.config_from_flags()
    finally:
        main.FLAGS.unparse_flags()
    config.init_from = config.bb_source = None  # models of other runs, which do not exist here
    if "pre_at" in path.name:
        config.pretrain_epochs = 1
    resolved = config.resolved()
    assert resolved.mode == "train" and resolved.out_dir.startswith("runs/")


def test_paper_presets_fill_unset_settings():
    config = RunConfig(dataset="cifar100", method="anp_vs").resolved()
    assert (config.model, config.eps, config.step_size, config.pgd_steps) == ("vgg16", 0.03, 0.007, 10)
    assert (config.beta_kl, config.lambda_vs, config.lr_decay_at) == (1.0, 0.1, (0.5, 0.8))
    config = RunConfig(dataset="mnist", step_size=0.1).resolved()
    assert config.eval_step_size == 0.01  # evaluation stays the paper's PGD-40, step 0.01


BAD_INPUTS = [
    (["--method=nope"], "method"),
    (["--eps=-0.1"], "eps must be >= 0"),
    (["--init_from=does/not/exist.keras"], "does not exist"),
    (["--model=vgg16", "--dataset=mnist"], "expects 32x32x3"),
    (["--epochs=many"], "epochs"),
    (["--flagfile=bad.cfg"], "Unknown command line flag 'no_such_flag'"),
    (["--init_from=bad.cfg"], "not a .keras model"),
    (["--dataset=cifar100"], "no cifar100 data found"),
    (["--mode=eval"], "--model_path"),
    (["--lr_decay_at=0.5,1.5"], "lr_decay_at"),
    (["--mask_groups=inner"], "applies to the residual models (resnet20, preact_resnet18)"),
    (["--mode=export", "--model_path=bad.cfg"], "--export_dir"),
    (["--mode=export", "--model_path=bad.cfg", "--export_dir=exported"], "not a .keras model"),
    (["--method=pre_at"], "pretrained"),
    (["--mode=tune", "--method=at"], "nothing of ANP-VS to tune"),
    (["--mode=tune", "--validation_examples=0"], "--validation_examples must be > 0"),
    (["--mode=tune", "--tuner=grid"], "tuner"),
    (["--mode=tune", "--method=at_vs", "--min_sparsity=10"], "prunes nothing"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_stops_with_one_line_before_any_work(tmp_path, data_dir, args, message):
    (tmp_path / "bad.cfg").write_text("--no_such_flag=1\n")
    out = tmp_path / "out"
    env_data = data_dir if "--dataset=cifar100" not in args else tmp_path  # nothing for cifar100
    result = run_cli(*args, f"--out_dir={out}", "--download=false", cwd=tmp_path, data_dir=env_data)
    lines = [l for l in result.stderr.splitlines() if l.startswith("anp_vs_tf: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not out.exists()


def _truncated_mnist(tmp_path, data_dir):
    """The real MNIST files, with the training images cut short as by a broken download."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for source in (data_dir / "mnist").iterdir():
        shutil.copy(source, folder)
    images = folder / "train-images-idx3-ubyte.gz"
    with gzip.open(images) as f:
        content = f.read()
    with gzip.open(images, "wb") as f:
        f.write(content[:-1000])
    return ["--dataset=mnist", f"--data_dir={tmp_path / 'data'}"]


def _folder_with_an_unreadable_image(tmp_path, data_dir):
    """Two CIFAR-10 classes as an image folder, one 'JPEG' of which is text."""
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(3):
                shutil.copy(data_dir / "cifar10-jpeg" / split / name / f"{i:04d}.jpg",
                            tmp_path / "tree" / split / name)
    (tmp_path / "tree" / "train" / "dog" / "0099.jpg").write_text("not an image")
    return ["--dataset=folder", f"--data_dir={tmp_path / 'tree'}", "--model=vgg16", "--on_bad_file=error"]


def _plain_keras_model(tmp_path, data_dir):
    """A valid .keras file, but of a model this package did not make."""
    import keras

    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(tmp_path / "plain.keras")
    return ["--mode=eval", f"--model_path={tmp_path / 'plain.keras'}"]


BAD_DATA = [
    (_truncated_mnist, "truncated"),
    (_folder_with_an_unreadable_image, "0099.jpg"),
    (_plain_keras_model, "not an anp_vs_tf RobustModel"),
]


@pytest.mark.parametrize("setup,message", BAD_DATA, ids=[s.__name__.strip("_") for s, _ in BAD_DATA])
def test_bad_data_or_model_stops_with_one_line_and_writes_nothing(tmp_path, data_dir, setup, message):
    args = setup(tmp_path, data_dir)
    out = tmp_path / "out"
    result = run_cli(*args, f"--out_dir={out}", "--download=false", cwd=tmp_path, data_dir=tmp_path)
    lines = [l for l in result.stderr.splitlines() if l.startswith("anp_vs_tf: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not out.exists()


def test_a_short_run_writes_metrics_and_evaluates_again(tmp_path, data_dir):
    out = tmp_path / "run"
    common = ["--dataset=mnist", "--test_subset=300", "--eval_pgd_steps=5", "--verbose=0"]
    result = run_cli(
        "--method=anp_vs", "--pretrain_epochs=1", "--epochs=1", "--train_subset=1200",
        "--pgd_steps=2", "--step_size=0.1", "--batch_size=100", f"--out_dir={out}", *common,
        cwd=tmp_path, data_dir=data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    base = json.loads((out / "base" / "metrics.json").read_text())
    for key in ("clean_acc", "pgd_acc", "vulnerability_wb", "sparsity_pct", "n_active", "params_kept_pct",
                "flops_speedup", "wall_time_s", "layer_vulnerability_wb", "memory_pct", "eval_attack"):
        assert key in metrics, key
    assert metrics["eval_attack"]["steps"] == 5 and metrics["eval_attack"]["step_size"] == 0.01
    assert set(metrics["sanity"]) >= {"accuracy_falls_with_eps", "unbounded_attack_succeeds", "all_passed"}
    assert 0 <= metrics["fgsm_acc"] <= 1
    assert metrics["num_examples"] == 300 and 0 <= metrics["pgd_acc"] <= metrics["clean_acc"] <= 1
    assert set(metrics["n_active"]) == {"conv1_bbd", "conv2_bbd", "flatten_bbd", "dense1_bbd"}
    assert base["method"] == "standard" and base["sparsity_pct"] == 0.0
    assert "| ANP-VS |" in result.stdout and "| Standard (base) |" in result.stdout
    for name in ("model.keras", "config.json", "checkpoints/checkpoint", "base/model.keras",
                 "plots/active_units.png", "plots/feature_vulnerability.png", "plots/loss_surface.png",
                 "plots/saliency.png", "base/plots/loss_surface.png"):
        assert (out / name).exists(), name
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000, png
    assert any((out / "logs").rglob("events.*"))

    # The saved model evaluates to the same clean accuracy from the command line.
    again = run_cli("--mode=eval", f"--model_path={out / 'model.keras'}", f"--out_dir={tmp_path / 'eval'}",
                    *common, cwd=tmp_path, data_dir=data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["clean_acc"] == pytest.approx(metrics["clean_acc"])
    assert evaluated["sparsity_pct"] == pytest.approx(metrics["sparsity_pct"])

    # A finished run is never overwritten by accident.
    before = (out / "metrics.json").read_bytes()
    repeat = run_cli("--method=anp_vs", f"--out_dir={out}", *common, cwd=tmp_path, data_dir=data_dir)
    assert repeat.returncode == 2 and "already holds a finished run" in repeat.stderr
    assert (out / "metrics.json").read_bytes() == before
