"""A run killed at any point and started again with the same command ends with the same weights."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import keras

import anp_vs_tf.trainers  # noqa: F401  (registers the classes the saved models use)
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# 3,000 examples in batches of 100: 30 steps per epoch, 4 epochs; ANP-VS exercises both
# optimizers, the masks' random draws and the attack's random starts.
RUN = [
    "--method=anp_vs", "--epochs=4", "--train_subset=3000", "--test_subset=100", "--batch_size=100",
    "--pgd_steps=2", "--step_size=0.1", "--eval_pgd_steps=2", "--sanity_examples=0", "--fgsm=false",
    "--plots=false", "--verbose=2", "--mask_a_init=2.0",
]


def start(out, data_dir, *extra):
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "anp_vs_tf.main", *RUN, f"--out_dir={out}", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def weights(out):
    model = keras.saving.load_model(out / "model.keras")
    return [v.numpy() for v in model.backbone.weights]


def checkpoints(out):
    return sorted((out / "checkpoints").glob("ckpt-*.index"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("whole") / "run"
    process = start(out, data_dir)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return weights(out)


def assert_same_weights(expected, out):
    for a, b in zip(expected, weights(out)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_sigkill_at_a_random_point_then_the_same_command_resumes_exactly(uninterrupted, tmp_path, data_dir):
    out = tmp_path / "run"
    process = start(out, data_dir)
    deadline = time.time() + 300
    while not checkpoints(out) and time.time() < deadline:  # past the first epoch
        time.sleep(0.2)
    time.sleep(random.uniform(0.0, 2.5))  # anywhere in the next epochs (about 1.5 s each)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoints(out), "the run died before its first checkpoint"
    assert not (out / "metrics.json").exists()
    resumed = start(out, data_dir)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout
    assert_same_weights(uninterrupted, out)


def test_sigterm_mid_epoch_saves_a_checkpoint_there_and_resumes_exactly(uninterrupted, tmp_path, data_dir):
    out = tmp_path / "run"
    process = start(out, data_dir)
    deadline = time.time() + 300
    while not checkpoints(out) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 143, stderr[-3000:]
    assert "Run the same command again to resume" in stderr
    steps = [int(p.name.split("-")[1].split(".")[0]) for p in checkpoints(out)]
    resumed = start(out, data_dir)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"at step {max(steps)}" in stdout
    assert_same_weights(uninterrupted, out)


def test_an_unfinished_checkpoint_is_never_the_one_restored(uninterrupted, tmp_path, data_dir):
    """A kill while a checkpoint is written leaves its files but not the index entry."""
    out = tmp_path / "run"
    process = start(out, data_dir, "--epochs=1")
    process.communicate(timeout=600)
    (out / "metrics.json").unlink()  # pretend the run stopped before the end
    latest = checkpoints(out)[-1]
    for suffix in (".index", ".data-00000-of-00001"):  # a newer checkpoint, cut off mid-write
        (out / "checkpoints" / f"ckpt-99{suffix}").write_bytes(b"\x00" * 10)
    resumed = start(out, data_dir, "--epochs=1")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resuming from {latest.with_suffix('')}" in stdout


# Whether a NaN image gives a NaN loss in its own step depends on the CPU's kernels:
# oneDNN's ReLU and max-pool returned 0 for a NaN input on the CPU this test was first
# written on, and NaN on an AVX2 AMD EPYC. Where NaN is dropped, the loss stays finite one step longer
# but the gradients are not, so the weights turn NaN and the next step's loss is NaN.
@pytest.mark.parametrize("first_nan_batch, stops, checkpoints_left", [
    # Step 36 is the first on NaN images: its loss is NaN, or else step 37's is.
    (35, ("the loss became nan at step 36", "the loss became nan at step 37"), ["ckpt-30"]),
    # Step 30, the last of epoch 1, is the first on NaN images: either its loss is NaN or
    # it poisons the weights just before the epoch's checkpoint; that state is not saved.
    (29, ("the loss became nan at step 30", "the weights became NaN or infinite by step 30"), []),
])
def test_nan_stops_the_run_naming_the_step_and_keeps_what_was_saved(
        first_nan_batch, stops, checkpoints_left, tmp_path, data_dir):
    import tensorflow as tf

    from anp_vs_tf import building, checkpointing, data, experiment
    from anp_vs_tf.config import RunConfig

    config = RunConfig(method="at", epochs=3, train_subset=3000, test_subset=100, batch_size=100,
                       pgd_steps=2, step_size=0.1, data_dir=str(data_dir), download=False).resolved()
    splits = data.load("mnist", data_dir=data_dir, batch_size=100, train_subset=3000, test_subset=100,
                       download=False)

    def poisoned(step):
        def maybe_nan(index, batch):
            x, y = batch
            return tf.where(index >= first_nan_batch, x * float("nan"), x), y

        return splits.train_from(step).enumerate(start=step).map(maybe_nan)

    model = building.build(config, splits.info)
    with pytest.raises(checkpointing.TrainingDiverged) as error:
        experiment.fit(model, splits._replace(train_from=poisoned), 3, 100, str(tmp_path), verbose=0)
    message = str(error.value)
    assert any(stop in message for stop in stops) and "last good checkpoint" in message, message
    assert ("ckpt-30" in message) == bool(checkpoints_left), message
    assert [p.stem for p in checkpoints(tmp_path)] == checkpoints_left
    restored = building.build(config, splits.info)
    if checkpoints_left:  # what was saved is intact and finite
        assert checkpointing.TrainingState(restored, str(tmp_path / "checkpoints")).restore() == 30
        assert all(np.all(np.isfinite(v.numpy())) for v in restored.weights)


def test_a_run_started_before_a_setting_existed_still_resumes(tmp_path):
    from anp_vs_tf.config import ConfigError, RunConfig
    from anp_vs_tf.run_dir import check_out_dir, prepare_out_dir

    config = RunConfig(out_dir=str(tmp_path / "run")).resolved()
    prepare_out_dir(config)
    path = tmp_path / "run" / "config.json"
    older = json.loads(path.read_text())
    del older["mixed_precision"]  # config.json of a run started before the flag existed
    path.write_text(json.dumps(older))
    check_out_dir(config)  # same settings: resumes
    with pytest.raises(ConfigError, match="different settings"):
        check_out_dir(RunConfig(out_dir=str(tmp_path / "run"), mixed_precision=True).resolved())
