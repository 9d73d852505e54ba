"""XLA-compiled steps match the ordinary graph steps, and synchronized batch norm uses the global batch.

XLA (`compile(jit_compile=True)`) on CPU
----------------------------------------
A RobustModel compiled with XLA must train and evaluate like the same model compiled
without it: after two `train_on_batch` steps from the same weights and seed, the
same logged losses, weights, Beta-Bernoulli mask parameters and optimizer slots, to
float rounding (rtol 1e-4). Under XLA `kernels.choose()` gives plain Keras ops and
one attack chunk; without XLA the step uses whatever "auto" picks for this CPU, and
PGD with chunks=2 runs two concurrent attack loops, so those are compared too.

Why that needs care: XLA draws *other random numbers* from the same stateless seed
with TensorFlow's own ops (TensorFlow 2.21, CPU):

1. from the same Philox bits, TensorFlow's kernel makes a float in [0, 1) of the low
   23 bits of a 32-bit word, XLA of the high 23 bits
   (`test_xla_draws_the_same_philox_bits_but_other_floats`);
2. with alg="auto_select" (the default of every `tf.random.stateless_*` op) XLA
   zero-extends a negative int32 seed word where TensorFlow sign-extends it, so such a
   seed gives another Philox stream, integer draws and `stateless_fold_in` included
   (`test_xla_makes_other_philox_bits_from_a_negative_seed_word`). Half of all derived
   seeds have a negative word.

So the package draws PGD's uniform random start and the masks' noise (the Kumaraswamy
draw of pi, the Logistic noise of the relaxed Bernoulli, their per-layer seeds) with
`seeds.stateless_uniform`, `fold_in` and `split`: alg="philox" and TensorFlow's
float mapping done by graph ops, bit for bit the draws of before without XLA and the
same numbers under XLA (tests/test_random_streams.py). With TensorFlow's random ops
untouched, what is compared:

- the whole step, random start and masks included, for AT and ANP-VS with PGD
  chunks=1, chunks=2 (AT) and the default chunks (the masks' noise goes through log,
  log1p and a sigmoid, which XLA computes to float rounding, not to the bit);
- AT with `random_start=False`, whose step has no random draw at all;
- `evaluate()` with an `eval_adversary` (standard and ANP-VS models from a trained
  LeNet-5): acc, acc_adv, loss and vulnerability, PGD without and with its default
  random start.

Not compared: PGD's Gaussian (TRADES) and L2 starts, whose Gaussian draws still differ
under XLA (see `seeds.stateless_uniform`).

Synchronized batch norm under MirroredStrategy
----------------------------------------------
Run in a subprocess, because the two logical CPU devices must be configured before
TensorFlow initializes. One `fit` step over two replicas (global batch 16 = 8 + 8); the
moving statistics of every replica's copy are checked against numpy: momentum * init +
(1 - momentum) * statistic (variance without Bessel's correction) of the global batch
for synchronized=True, of the replica's own half for synchronized=False (every
replica's copy of the MirroredVariable then keeps its own statistics, and the copies
no longer agree). For AT, whose x~ here is a deterministic stand-in numpy can
recompute, fuse_views=False updates the statistics twice (x, then x~) and
fuse_views=True once over [x; x~]. VGG-16's synchronized_bn flag is checked the same
way on its first batch norm.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, models
from anp_vs_tf.data import load_arrays
from anp_vs_tf.trainers import RobustModel, get_method

BATCH = 32


@pytest.fixture(scope="module")
def mnist_batch(data_dir):
    """The first 32 real MNIST training images, in [0, 1]."""
    images, labels, _ = load_arrays("mnist", "train", data_dir=data_dir, download=False)
    return images[:BATCH].astype("float32") / 255.0, labels[:BATCH].astype("int32")


def _high_bits_to_unit_float(bits):
    """A uint32 word -> a float in [0, 1) from its high 23 bits, as XLA maps them."""
    mantissa = tf.bitwise.right_shift(bits, tf.constant(9, tf.uint32))
    one_to_two = tf.bitwise.bitwise_or(mantissa, tf.constant(0x3F800000, tf.uint32))
    return tf.bitcast(one_to_two, tf.float32) - 1.0


def _low_bits_to_unit_float(bits):
    """A uint32 word -> a float in [0, 1) from its low 23 bits, as TensorFlow's kernels map them."""
    mantissa = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFF, tf.uint32))
    one_to_two = tf.bitwise.bitwise_or(mantissa, tf.constant(0x3F800000, tf.uint32))
    return tf.bitcast(one_to_two, tf.float32) - 1.0


def _draws(seed, alg="auto_select"):
    bits = tf.random.stateless_uniform([256], seed, minval=None, maxval=None, dtype=tf.uint32, alg=alg)
    floats = tf.random.stateless_uniform([256], seed, alg=alg)
    return bits, floats, tf.random.experimental.stateless_fold_in(seed, 5, alg=alg)


def _with_and_without_xla(function, *args):
    graph = [t.numpy() for t in tf.function(function)(*args)]
    xla = [t.numpy() for t in tf.function(function, jit_compile=True)(*args)]
    return graph, xla


def test_xla_draws_the_same_philox_bits_but_other_floats():
    """Finding 1, on TensorFlow 2.21's CPU kernels: from a seed of non-negative words both
    compilers make the same Philox bits (and derived seeds), but TensorFlow maps the low
    23 bits of a word to a float in [0, 1) and XLA the high 23 bits.

    If TensorFlow ever maps them alike, this test fails, and `seeds.stateless_uniform`
    would no longer need to map the bits itself.
    """
    (bits, floats, folded), (bits_xla, floats_xla, folded_xla) = _with_and_without_xla(
        _draws, tf.constant([7, 3], tf.int32))
    np.testing.assert_array_equal(bits_xla, bits)  # the same Philox stream ...
    np.testing.assert_array_equal(folded_xla, folded)  # ... and the same derived seeds
    low_bits = ((bits & 0x7FFFFF) | 0x3F800000).view(np.float32) - 1.0
    np.testing.assert_array_equal(floats, low_bits)  # TensorFlow: the low 23 bits
    np.testing.assert_array_equal(_low_bits_to_unit_float(tf.constant(bits)).numpy(), low_bits)
    np.testing.assert_array_equal(floats_xla, _high_bits_to_unit_float(tf.constant(bits)).numpy())  # XLA: the high
    assert np.mean(np.abs(floats - floats_xla)) > 0.1  # so the floats are unrelated draws


def test_xla_makes_other_philox_bits_from_a_negative_seed_word():
    """Finding 2: with alg="auto_select" (the default of every tf.random.stateless_* op),
    XLA zero-extends each int32 seed word to 64 bits where TensorFlow's CPU kernel
    sign-extends it, so a seed with a negative word gives another Philox stream, even
    for integer draws and `stateless_fold_in`. Half of all derived seeds are negative:
    `stateless_fold_in(step seed, stream)` in RobustModel.step_seed, the per-layer
    fold-ins of the masks. With alg="philox" the key comes from graph ops and agrees.
    """
    negative = [-409271666, 1]
    (bits, _, folded), (bits_xla, _, folded_xla) = _with_and_without_xla(_draws, tf.constant(negative, tf.int32))
    assert not np.array_equal(bits_xla, bits)
    assert not np.array_equal(folded_xla, folded)
    zero_extended, _, _ = (t.numpy() for t in _draws(tf.constant([w % 2**32 for w in negative], tf.int64)))
    np.testing.assert_array_equal(bits_xla, zero_extended)
    (bits_philox, _, folded_philox), (bits_philox_xla, _, folded_philox_xla) = _with_and_without_xla(
        lambda seed: _draws(seed, "philox"), tf.constant(negative, tf.int32))
    np.testing.assert_array_equal(bits_philox, bits)  # on a CPU, "philox" is what "auto_select" picks ...
    np.testing.assert_array_equal(bits_philox_xla, bits_philox)  # ... and XLA agrees with it
    np.testing.assert_array_equal(folded_philox_xla, folded_philox)


# -- one or two training steps, with and without XLA ---------------------------------------

PGDS = {
    "chunks=1": dict(chunks=1),
    # Two concurrent attack loops without XLA: what chunks="auto" picks on the CPUs of
    # kernels.MEASURED, whatever this machine's choice is.
    "chunks=2": dict(chunks=2),
    # chunks="auto": kernels.choose() decides when the step is traced (1 under XLA).
    "default": dict(),
}


def _pgd(settings, **changes):
    return attacks.PGD(0.3, 0.1, 3, **{**settings, **changes})


def _robust_model(method_name, adversary, jit_compile, weights=None):
    keras.utils.set_random_seed(0)
    method = get_method(method_name, num_train_examples=60000, beta_kl=4.0, lambda_vs=1.0)
    backbone = models.lenet5_caffe(prunable=method.prunes,
                                   mask_kwargs=dict(a_init=2.0, seed=0) if method.prunes else None)
    if weights is not None:
        backbone.set_weights(weights)
    model = RobustModel(backbone, method, adversary=adversary, seed=0)
    model.compile(keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    assert model.jit_compile is jit_compile  # Keras did not turn XLA off
    return model


def _train_with_and_without_xla(method_name, adversary, x, y, steps=2):
    """Train two models from the same weights with the same seed, one of them under XLA."""
    graph = _robust_model(method_name, adversary, jit_compile=False)
    initial = graph.backbone.get_weights()
    xla = _robust_model(method_name, adversary, jit_compile=True, weights=initial)
    results = []
    for model in (graph, xla):
        logs = [model.train_on_batch(x, y, return_dict=True) for _ in range(steps)]
        results.append((model, logs))
    return initial, results


def _assert_same_step(trained, method_name):
    initial, ((graph, graph_logs), (xla, xla_logs)) = trained
    for step, (expected, got) in enumerate(zip(graph_logs, xla_logs)):
        assert set(got) == set(expected)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} after step {step + 1}")
    for expected, got in zip(graph.backbone.weights, xla.backbone.weights):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5, err_msg=expected.path)
    optimizers = [(graph.optimizer, xla.optimizer)]
    if method_name == "anp_vs":
        assert len(xla.mask_variables) == 8  # a and b of conv1, conv2, flatten, dense1
        for expected, got in zip(graph.mask_variables, xla.mask_variables):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5, err_msg=expected.path)
        optimizers.append((graph.mask_optimizer, xla.mask_optimizer))
    for graph_optimizer, xla_optimizer in optimizers:
        for expected, got in zip(graph_optimizer.variables, xla_optimizer.variables):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6, err_msg=expected.path)
    # The steps did something: every trainable weight (and mask parameter) moved; the
    # non-trainable frozen-mask state of the masks (issue 23) stays as it was.
    for w, w0 in zip(xla.backbone.weights, initial):
        if w.trainable:
            assert np.max(np.abs(w.numpy() - w0)) > 1e-5, w.path
        else:
            np.testing.assert_array_equal(w.numpy(), w0, err_msg=w.path)


@pytest.mark.parametrize("method_name,pgd", [
    ("at", "chunks=1"), ("at", "chunks=2"), ("anp_vs", "chunks=1"), ("anp_vs", "default"),
])
def test_xla_train_step_matches_graph_step(method_name, pgd, mnist_batch):
    """AT and ANP-VS, two steps each, random start and masks included (see the module
    docstring); AT with the default chunks is the test after next."""
    x, y = mnist_batch
    _assert_same_step(_train_with_and_without_xla(method_name, _pgd(PGDS[pgd]), x, y), method_name)


@pytest.mark.parametrize("pgd", PGDS)
def test_xla_adversarial_training_step_matches_without_random_start(pgd, mnist_batch):
    """AT with TensorFlow's random ops untouched: without a random start nothing is random."""
    x, y = mnist_batch
    _assert_same_step(_train_with_and_without_xla("at", _pgd(PGDS[pgd], random_start=False), x, y), "at")


def test_xla_adversarial_training_step_with_random_start_matches(mnist_batch):
    """AT with the default PGD (random start) and TensorFlow's random ops as they are: the
    same random start under XLA, because the package draws it with `seeds.stateless_uniform`."""
    x, y = mnist_batch
    _assert_same_step(_train_with_and_without_xla("at", _pgd(PGDS["default"]), x, y), "at")


# -- evaluate() with an eval_adversary -----------------------------------------------------

def _evaluation_model(trained_lenet, method_name, eval_adversary, jit_compile):
    """A copy of the trained LeNet-5 (masks added for anp_vs), compiled with or without XLA."""
    method = get_method(method_name, num_train_examples=60000)
    backbone = models.lenet5_caffe(prunable=method.prunes, mask_kwargs=dict(a_init=2.0))
    for layer in trained_lenet.backbone.layers:  # the layer names are the same with masks
        if layer.weights:
            backbone.get_layer(layer.name).set_weights(layer.get_weights())
    adversary = attacks.PGD(0.3, 0.1, 3) if method.adversarial else None
    model = RobustModel(backbone, method, adversary=adversary, eval_adversary=eval_adversary, seed=0)
    model.compile(keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    assert model.jit_compile is jit_compile
    return model


def _evaluate_with_and_without_xla(trained_lenet, mnist_subset, method_name, eval_adversary):
    _, _, x_test, y_test = mnist_subset
    x, y = x_test[:256], y_test[:256]
    return [
        _evaluation_model(trained_lenet, method_name, eval_adversary, jit).evaluate(
            x, y, batch_size=128, verbose=0, return_dict=True)
        for jit in (False, True)
    ]


def _assert_same_evaluation(graph, xla):
    assert set(xla) == set(graph) >= {"loss", "acc", "acc_adv", "vulnerability"}
    # The attack is strong enough to matter and weak enough that flipped examples would show.
    assert graph["acc"] > graph["acc_adv"] > 0.0, graph
    np.testing.assert_allclose(xla["acc"], graph["acc"], atol=1e-7)
    np.testing.assert_allclose(xla["acc_adv"], graph["acc_adv"], atol=1e-7)
    np.testing.assert_allclose(xla["loss"], graph["loss"], rtol=1e-4)
    np.testing.assert_allclose(xla["vulnerability"], graph["vulnerability"], rtol=1e-4)


@pytest.mark.parametrize("method_name", ["standard", "anp_vs"])
def test_xla_evaluate_with_eval_adversary_matches(method_name, trained_lenet, mnist_subset):
    """evaluate() under XLA: the same acc and acc_adv (PGD from x, no random start)."""
    eval_adversary = attacks.PGD(0.1, 0.05, 3, random_start=False)
    _assert_same_evaluation(*_evaluate_with_and_without_xla(trained_lenet, mnist_subset, method_name,
                                                            eval_adversary))


def test_xla_evaluate_with_random_start_matches(trained_lenet, mnist_subset):
    """evaluate() under XLA with the default random start."""
    _assert_same_evaluation(*_evaluate_with_and_without_xla(trained_lenet, mnist_subset, "standard",
                                                            attacks.PGD(0.1, 0.05, 3)))


# -- synchronized batch norm under MirroredStrategy over two logical CPUs -------------------

SYNC_BN = r'''
import sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from anp_vs_tf import data, models
from anp_vs_tf.trainers import RobustModel

OUT = sys.argv[1]
MOMENTUM = 0.5
images, labels, _ = data.load_arrays("mnist", "train", download=False)
# Replica 0 gets eight 1s, replica 1 eight 0s: their batch statistics differ clearly.
keep = np.concatenate([np.flatnonzero(labels == 1)[:8], np.flatnonzero(labels == 0)[:8]])
x = images[keep][:, ::3, ::3].astype("float32") / 255.0  # 10 x 10
y = labels[keep].astype("int32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2


class Deterministic:
    """A deterministic stand-in for the attack, so numpy can recompute x~ = 1 - x^2."""

    def __call__(self, logits_fn, x, y, seed=None):
        return 1.0 - x * x


def small_backbone(synchronized):
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = keras.layers.BatchNormalization(momentum=MOMENTUM, synchronized=synchronized, name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    logits = keras.layers.Dense(10, name="logits")(keras.layers.Flatten(name="flatten")(h))
    return keras.Model(inputs, {"logits": logits, "latents": [h]})


def replica_copies(variable):
    value = getattr(variable, "value", variable)
    return np.stack([np.asarray(v.numpy()) for v in getattr(value, "values", [value])])


def one_step(backbone, method, fuse_views, x, y, bn_name):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = RobustModel(backbone, method, adversary=Deterministic() if method != "standard" else None,
                            fuse_views=fuse_views, seed=0)
        model.compile(keras.optimizers.SGD(0.1))
    kernel = backbone.get_layer("conv" if bn_name == "bn" else "conv1").kernel.numpy()
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    bn = backbone.get_layer(bn_name)
    return kernel, replica_copies(bn.moving_mean), replica_copies(bn.moving_variance)


results = {"x": x, "momentum": np.float32(MOMENTUM)}
for synchronized in (True, False):
    for method, fuse in (("standard", False), ("at", False), ("at", True)):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            backbone = small_backbone(synchronized)
        key = f"small/{int(synchronized)}/{method}/{int(fuse)}"
        for name, value in zip(("kernel", "mean", "variance"), one_step(backbone, method, fuse, x, y, "bn")):
            results[f"{key}/{name}"] = value

# VGG-16's own flag, one standard step on MNIST digits padded to 32 x 32 x 3 (2 per replica).
x_vgg = np.pad(x[[0, 1, 8, 9]], ((0, 0), (11, 11), (11, 11), (0, 0))).repeat(3, axis=-1)
results["vgg_x"] = x_vgg
for synchronized in (True, False):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        backbone = models.vgg16(synchronized_bn=synchronized)
    assert all(l.synchronized == synchronized for l in backbone.layers
               if isinstance(l, keras.layers.BatchNormalization))
    stats = one_step(backbone, "standard", False, x_vgg, y[[0, 1, 8, 9]], "bn1")
    for name, value in zip(("kernel", "mean", "variance"), stats):
        results[f"vgg/{int(synchronized)}/{name}"] = value
np.savez(OUT, **results)
'''


@pytest.fixture(scope="module")
def sync_bn_results(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("sync_bn") / "stats.npz"
    env = {**os.environ, "ANP_VS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.run([sys.executable, "-c", SYNC_BN, str(out)], env=env, text=True,
                             capture_output=True, timeout=600, cwd=pathlib.Path(__file__).parents[1])
    assert process.returncode == 0, process.stderr[-4000:]
    with np.load(out) as stats:
        return dict(stats)


def _conv_valid(x, kernel):
    """A stride-1 'valid' convolution (cross-correlation, as Keras) in numpy."""
    kh, kw, cin, _ = kernel.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw, cin), axis=(1, 2, 3))
    windows = windows[:, :, :, 0]  # (N, H', W', kh, kw, cin)
    return np.einsum("nhwijk,ijko->nhwo", windows.astype(np.float64), kernel.astype(np.float64))


def _statistics(z):
    """Per-channel mean and variance over (N, H, W), without Bessel's correction as Keras."""
    return z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))


def _moving(statistics_per_call, momentum, init=(0.0, 1.0)):
    """The moving (mean, variance) after one BN call per entry, from Keras' initial (0, 1)."""
    mean, variance = (np.float64(v) for v in init)
    for m, v in statistics_per_call:
        mean, variance = momentum * mean + (1 - momentum) * m, momentum * variance + (1 - momentum) * v
    return mean, variance


def _expected_small(x, kernel, momentum, method, fuse, replica=None):
    """What each replica's moving statistics should be: over the global batch if replica is None."""
    if replica is not None:
        x = x[8 * replica: 8 * replica + 8]
    clean = _conv_valid(x, kernel)
    if method == "standard":
        return _moving([_statistics(clean)], momentum)
    adversarial = _conv_valid(1.0 - x * x, kernel)  # Deterministic()
    if fuse:  # one call on [x; x~]
        return _moving([_statistics(np.concatenate([clean, adversarial]))], momentum)
    return _moving([_statistics(clean), _statistics(adversarial)], momentum)  # x, then x~


def _clearly_differ(a, b):
    """Apart by 100 times the tolerance the equalities above are checked to."""
    return np.max(np.abs(np.asarray(a, np.float64) - b)) > 1e-4


SMALL_CASES = [("standard", False), ("at", False), ("at", True)]


def _assert_stats(mean, variance, expected, err_msg):
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-6, err_msg=err_msg + " moving_mean")
    np.testing.assert_allclose(variance, expected[1], rtol=1e-5, atol=1e-6, err_msg=err_msg + " moving_variance")


@pytest.mark.parametrize("method,fuse", SMALL_CASES, ids=["standard", "at-two-calls", "at-fused"])
def test_synchronized_batch_norm_uses_the_global_batch(sync_bn_results, method, fuse):
    stats, momentum = sync_bn_results, float(sync_bn_results["momentum"])
    key = f"small/1/{method}/{int(fuse)}"
    mean, variance = stats[f"{key}/mean"], stats[f"{key}/variance"]
    assert mean.shape == variance.shape == (2, 4)  # both replicas' copies, 4 channels
    expected = _expected_small(stats["x"], stats[f"{key}/kernel"], momentum, method, fuse)
    for replica in range(2):  # every copy holds the global statistics
        _assert_stats(mean[replica], variance[replica], expected, f"{key} replica {replica}")
    if method == "at":  # and the two ways of forwarding x and x~ are told apart
        other = _expected_small(stats["x"], stats[f"{key}/kernel"], momentum, method, not fuse)
        assert _clearly_differ(expected[0], other[0]) and _clearly_differ(expected[1], other[1])


@pytest.mark.parametrize("method,fuse", SMALL_CASES, ids=["standard", "at-two-calls", "at-fused"])
def test_unsynchronized_batch_norm_keeps_per_replica_statistics(sync_bn_results, method, fuse):
    """The control: without synchronization each replica normalizes and tracks its own half,
    which differs from the global statistics the synchronized test expects."""
    stats, momentum = sync_bn_results, float(sync_bn_results["momentum"])
    key = f"small/0/{method}/{int(fuse)}"
    mean, variance = stats[f"{key}/mean"], stats[f"{key}/variance"]
    x, kernel = stats["x"], stats[f"{key}/kernel"]
    global_mean, global_variance = _expected_small(x, kernel, momentum, method, fuse)
    for replica in range(2):
        expected = _expected_small(x, kernel, momentum, method, fuse, replica)
        _assert_stats(mean[replica], variance[replica], expected, f"{key} replica {replica}")
        # ... which are not the global statistics.
        assert _clearly_differ(mean[replica], global_mean), (key, replica)
        assert _clearly_differ(variance[replica], global_variance), (key, replica)
    assert _clearly_differ(mean[0], mean[1])  # the mirrored copies have drifted apart


def _vgg_bn1_expected(x, kernel, momentum, replica=None):
    """VGG-16's bn1 input: standardize (CIFAR mean/std), then conv1 3x3 'same', no bias."""
    if replica is not None:
        x = x[2 * replica: 2 * replica + 2]
    standardized = (x - np.array(models.zoo.CIFAR_MEAN)) / np.array(models.zoo.CIFAR_STD)
    z = _conv_valid(np.pad(standardized, ((0, 0), (1, 1), (1, 1), (0, 0))), kernel)
    return _moving([_statistics(z)], momentum)


def test_vgg16_synchronized_bn_uses_the_global_batch(sync_bn_results):
    stats = sync_bn_results
    momentum = 0.99  # Keras' default, which VGG-16 keeps
    synced = [stats[f"vgg/1/{name}"] for name in ("kernel", "mean", "variance")]
    expected = _vgg_bn1_expected(stats["vgg_x"], synced[0], momentum)
    for replica in range(2):
        _assert_stats(synced[1][replica], synced[2][replica], expected, f"vgg16 bn1 replica {replica}")
    kernel, mean, variance = (stats[f"vgg/0/{name}"] for name in ("kernel", "mean", "variance"))
    global_mean, global_variance = _vgg_bn1_expected(stats["vgg_x"], kernel, momentum)
    for replica in range(2):
        _assert_stats(mean[replica], variance[replica],
                      _vgg_bn1_expected(stats["vgg_x"], kernel, momentum, replica), f"vgg16 unsynced {replica}")
        assert _clearly_differ(variance[replica], global_variance), replica
    assert _clearly_differ(variance[0], variance[1])
