"""Regression: the quickstart aborted in its loss-surface plot on AVX-512 CPUs (issue 21).

Root cause: TensorFlow 2.21's oneDNN MaxPoolGrad kernel (the graph-mode rewrite; eager
mode runs another kernel) aborts the process on an empty batch,

    F tensor.cc:896] Check failed: dtype() == expected_dtype (1 vs. 3)  int32 expected, got float
        tensorflow::MklMaxPoolingGradOp<>::Compute()

and PGD with `chunks=2` split the loss surface's one image into chunks of 0 and 1
rows. On a 2-core AVX-512 CPU (avx512f, avx512_bf16, amx_bf16) one `tf.function` taking
the gradient of `tf.nn.max_pool2d` over a (0, 8, 8, 2) tensor is enough to abort; with
`TF_ENABLE_ONEDNN_OPTS=0` it runs. An attack therefore never gives a model an empty
batch: chunks are never empty, and an empty batch comes back as it is.

Each case runs in a subprocess with oneDNN on, so an abort fails the test instead of
killing the test worker.
"""

import os
import subprocess
import sys
import textwrap

import pytest

PLOTS_PATH = """
import numpy as np, tensorflow as tf
from anp_vs_tf import analysis, attacks, models
from anp_vs_tf.trainers import RobustModel

model = RobustModel(models.lenet5_caffe(), "standard", seed=0)
x = np.random.RandomState(0).rand(3, 28, 28, 1).astype("float32")
y = np.array([3, 1, 4], np.int32)
for chunks in ("auto", 1, 2, 3):
    attack = attacks.PGD(0.3, 0.01, 5, chunks=chunks)
    # The quickstart's plots path: the loss surface around one image, along PGD's direction.
    surface = analysis.loss_surface(model, x[0], y[0], adversary=attack, resolution=3)
    assert np.isfinite(surface["losses"]).all()
    # PGD over the zoo's LeNet-5 in a compiled function, on 1 and on 0 images.
    one = analysis.attack_batch(model, x[:1], y[:1], attack)
    none = analysis.attack_batch(model, x[:0], y[:0], attack)
    assert one.shape == (1, 28, 28, 1) and none.shape == (0, 28, 28, 1)
    assert np.abs(one - x[:1]).max() <= 0.3 + 1e-6
print("ok")
"""


def _run(script):
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_attacks_on_one_and_zero_images_do_not_abort_under_onednn():
    result = _run(PLOTS_PATH)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit {result.returncode}:\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("chunks", [1, 2])
def test_pgd_gives_an_empty_batch_back(chunks):
    import tensorflow as tf

    from anp_vs_tf.attacks import PGD

    calls = []

    def logits_fn(x):
        calls.append(x)
        return tf.zeros([tf.shape(x)[0], 10])

    x, y = tf.zeros([0, 4, 4, 1]), tf.zeros([0], tf.int32)
    attack = PGD(0.1, 0.1, 3, chunks=chunks)
    assert attack(logits_fn, x, y, [1, 2]).shape == (0, 4, 4, 1)
    assert not calls  # eagerly only the taken branch runs: the model never saw the empty batch
    assert tf.function(lambda x, y: attack(logits_fn, x, y, [1, 2]))(x, y).shape == (0, 4, 4, 1)
