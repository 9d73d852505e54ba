"""anp_vs_tf.kernels: the faster CPU kernels equal the plain ops (values and gradients),
the choice of where they run, and a model that never stores them."""

import functools
import json
import pathlib
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, kernels, models
from anp_vs_tf.kernels import choice as choice_module
from anp_vs_tf.kernels.few_channel_conv import _block_taps, conv2d_fast_input_gradient, conv_relu_max_pool
from anp_vs_tf.kernels.same_conv import SMALL_MAP, _tap_indices, conv2d_as_matmul, conv2d_same, dense_is_cheaper
from anp_vs_tf.models.folding import folded_logits
from anp_vs_tf.trainers import RobustModel

DATA = pathlib.Path(__file__).parent / "data"
ALL_REWRITES = kernels.KernelChoice(True, True, True, attack_chunks=2, own_gradient_function=True)


def outputs_and_gradients(f, x, w, upstream_seed=3):
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = f(x, w)
        loss = tf.reduce_sum(y * tf.random.stateless_normal(y.shape, [0, upstream_seed]))
    return [y] + tape.gradient(loss, [x, w])


def assert_same_op(fast, plain, x, w):
    for a, b in zip(outputs_and_gradients(plain, x, w), outputs_and_gradients(fast, x, w)):
        a = a.numpy()
        np.testing.assert_allclose(b.numpy(), a, atol=1e-5 * max(1.0, np.abs(a).max()), rtol=1e-5)


# -- the kernels equal the ops they replace ------------------------------------------------


@pytest.mark.parametrize("shape, kernel, padding", [
    ((8, 28, 28, 1), (5, 5, 1, 20), "VALID"),  # LeNet-5-Caffe's conv1
    ((4, 32, 32, 3), (3, 3, 3, 16), "SAME"),   # VGG-16's conv1
    ((4, 9, 11, 2), (3, 4, 2, 5), "SAME"),     # uneven kernel: TF pads more at the bottom/right
    ((4, 9, 11, 2), (3, 4, 2, 5), "VALID"),
])
def test_few_channel_conv_equals_tf_conv2d_with_gradients(shape, kernel, padding):
    x, w = tf.random.stateless_uniform(shape, [0, 1]), tf.random.stateless_normal(kernel, [0, 2])
    assert_same_op(lambda x, w: conv2d_fast_input_gradient(x, w, padding),
                   lambda x, w: tf.nn.conv2d(x, w, 1, padding), x, w)


@pytest.mark.parametrize("shape, kernel, padding, with_bias", [
    ((4, 28, 28, 1), 5, "VALID", True),   # LeNet-5-Caffe's conv1 and pool1
    ((4, 32, 32, 3), 3, "SAME", True),
    ((4, 13, 11, 2), 4, "VALID", False),  # odd maps: the pool drops the last row or column
    ((4, 9, 10, 1), 2, "SAME", True),
])
def test_conv_relu_max_pool_equals_the_three_ops_with_input_gradient(shape, kernel, padding, with_bias):
    # Zeroed regions and a positive bias make windows of equal values; max-pooling's
    # gradient goes to one of them, and so must this one's.
    x = tf.random.stateless_uniform(shape, [0, 4])
    x = tf.where(x < 0.5, 0.0, x)
    w = tf.random.stateless_normal((kernel, kernel, shape[-1], 6), [0, 5])
    b = tf.abs(tf.random.stateless_normal((6,), [0, 6])) if with_bias else None

    def three_ops(x, w):
        z = tf.nn.conv2d(x, w, 1, padding)
        return tf.nn.max_pool2d(tf.nn.relu(z if b is None else z + b), 2, 2, "VALID")

    assert_same_op(lambda x, w: conv_relu_max_pool(x, w, b, padding), three_ops, x, w)


def test_block_taps_by_hand():
    # A 1-D view: kernel of 3 taps; block tap P links pixel 2P + r to output a through tap 2P + r - a.
    taps = _block_taps(3, 1)[:, 0, :, 0, :, 0]  # (P, r, a)
    np.testing.assert_array_equal(taps, [[[0, 3], [1, 0]],    # P=0: r=0 -> a=0 tap 0; r=1 -> taps 1, 0
                                         [[2, 1], [3, 2]]])   # P=1: r=0 -> taps 2, 1; r=1 -> a=1 tap 2


def test_tap_indices_by_hand():
    # 2x2 map, 3x3 kernel; positions 0 1 / 2 3; taps 0..8 row-major, 9 = none.
    # Output q reads input p through tap (p_row - q_row + 1, p_col - q_col + 1).
    expected = np.array([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    np.testing.assert_array_equal(_tap_indices(2, 2, 3, 3), expected)
    # A 1x3 map and a 1x2 kernel: TF's 'same' pads 0 left, 1 right, so q reads q and q+1.
    np.testing.assert_array_equal(_tap_indices(1, 3, 1, 2), [[0, 2, 2], [1, 0, 2], [2, 1, 0]])


def test_dense_is_cheaper_counts_multiply_adds():
    assert dense_is_cheaper((2, 2), (3, 3))      # 4 positions < 9 taps: VGG-16's last block
    assert not dense_is_cheaper((3, 3), (3, 3))  # as many: nothing to gain
    assert not dense_is_cheaper((None, 2), (3, 3))
    assert SMALL_MAP == 8 * 8


matmul_kernel_gradient = functools.partial(conv2d_same, kernel_gradient_by_matmuls=True)


@pytest.mark.parametrize("conv, map_shape, kernel", [
    (conv2d_as_matmul, (2, 2), (3, 3)), (conv2d_as_matmul, (1, 1), (3, 3)), (conv2d_as_matmul, (2, 3), (3, 5)),
    (conv2d_as_matmul, (1, 3), (2, 2)), (conv2d_as_matmul, (2, 1), (5, 1)),
    (conv2d_same, (4, 4), (3, 3)), (conv2d_same, (9, 8), (5, 3)), (conv2d_same, (1, 1), (3, 3)),
    (conv2d_same, (5, 7), (3, 4)), (conv2d_same, (6, 6), (2, 2)),  # TF pads more at the bottom/right
    (matmul_kernel_gradient, (4, 4), (3, 3)), (matmul_kernel_gradient, (5, 7), (3, 4)),
    (matmul_kernel_gradient, (6, 6), (2, 2)),
])
def test_same_conv_rewrites_equal_tf_conv2d_with_gradients(conv, map_shape, kernel):
    x = tf.random.stateless_normal((3,) + map_shape + (4,), [0, 1])
    w = tf.random.stateless_normal(kernel + (4, 6), [0, 2])
    assert_same_op(conv, lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"), x, w)


# -- where they run --------------------------------------------------------------------


def op_types(fn, spec):
    return {op.type for op in tf.function(fn).get_concrete_function(spec).graph.get_operations()}


def input_gradient(logits_fn):
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(logits_fn(x))
        return tape.gradient(loss, x)
    return run


def test_the_attack_network_uses_a_rewrite_only_where_chosen():
    backbone = models.vgg16()
    spec = tf.TensorSpec((2, 32, 32, 3))
    plain = op_types(input_gradient(folded_logits(backbone, "keras")), spec)
    fast = op_types(input_gradient(folded_logits(backbone, ALL_REWRITES)), spec)
    assert "Conv2DBackpropInput" in plain and "Conv2DBackpropInput" not in fast  # every conv rewritten
    assert "MatMul" in fast  # the 2x2-map convolutions
    lenet = models.lenet5_caffe()
    spec = tf.TensorSpec((2, 28, 28, 1))
    assert "SpaceToDepth" in op_types(folded_logits(lenet, ALL_REWRITES), spec)  # conv1 + pool1 as blocks
    assert "SpaceToDepth" not in op_types(folded_logits(lenet, "keras"), spec)
    x = tf.random.stateless_uniform((4, 32, 32, 3), [0, 9])
    np.testing.assert_allclose(folded_logits(backbone, ALL_REWRITES)(x).numpy(),
                               folded_logits(backbone, "keras")(x).numpy(), rtol=1e-4, atol=1e-4)


def test_choose_keras_and_xla_and_onednn_off_give_plain_ops(monkeypatch):
    monkeypatch.setattr(choice_module, "cpu_family", lambda: "avx2")
    assert kernels.choose("auto", "float32") == kernels.MEASURED[("avx2", "float32")]
    assert kernels.choose("auto", "bfloat16") == kernels.PLAIN  # not measured in that dtype
    assert kernels.choose("keras", "float32") == kernels.PLAIN
    assert kernels.choose(ALL_REWRITES) == ALL_REWRITES  # an explicit choice is taken as it is
    seen = {}
    tf.function(lambda: seen.setdefault("xla", kernels.choose("auto", "float32")) and 0, jit_compile=True)()
    assert seen["xla"] == kernels.PLAIN
    with kernels.use("keras"):
        assert kernels.choose(dtype="float32") == kernels.PLAIN
    assert kernels.active_setting() == "auto"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert kernels.choose("auto", "float32") == kernels.PLAIN
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.setattr(choice_module, "cpu_family", lambda: "other")
    assert kernels.choose("auto", "float32") == kernels.PLAIN
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.choose("fast")


@pytest.mark.parametrize("batch", [9, 1])
def test_pgd_auto_chunks_give_the_examples_of_one_chunk(trained_lenet, mnist_subset, batch):
    x, y = (tf.constant(a[:batch]) for a in mnist_subset[2:])
    seed = tf.constant([4, 2])

    def adversarial(chunks, setting):
        attack = attacks.PGD(0.3, 0.05, 5, chunks=chunks)
        with kernels.use(setting):
            return tf.function(lambda x, y: attack(trained_lenet.inference_logits, x, y, seed))(x, y).numpy()

    single = adversarial(1, "keras")
    for setting in ("auto", "keras", ALL_REWRITES):  # ALL_REWRITES: 2 chunks wherever this runs
        np.testing.assert_allclose(adversarial("auto", setting), single, atol=1e-6)


# -- the model holds only Keras layers ----------------------------------------------------

OWN = {"BetaBernoulliDropout", "GaussianConv2D", "GaussianDense", "SelectFeatures"}


def class_names(config):
    """Every (module, class_name) a serialized Keras config names."""
    found = set()
    if isinstance(config, dict):
        if "class_name" in config and "module" in config:
            found.add((config["module"], config["class_name"]))
        for value in config.values():
            found |= class_names(value)
    elif isinstance(config, list):
        for value in config:
            found |= class_names(value)
    return found


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("variant", [{}, {"prunable": True}, {"bayesian_kwargs": {}}])
def test_zoo_configs_name_only_keras_and_the_methods_layers(name, variant):
    config = keras.saving.serialize_keras_object(models.build_model(name, **variant))
    for module, class_name in class_names(config):
        assert module.startswith("keras") or class_name in OWN, (module, class_name)


def test_files_saved_with_the_old_speed_only_layers_load_as_keras_layers():
    """tests/data/legacy_fast_layers.keras: saved by 1692e51 (make_legacy_fast_layers.py)."""
    path = DATA / "legacy_fast_layers.keras"
    with zipfile.ZipFile(path) as archive:
        saved = json.dumps(json.loads(archive.read("config.json")))
    for old in ("InputConv2D", "SameConv2D", "SmallMapConv2D", "FusedBatchNormalization"):
        assert f"anp_vs_tf>{old}" in saved
    model = keras.saving.load_model(path)
    assert isinstance(model, RobustModel)
    types = {layer.name: type(layer) for layer in model.backbone.layers}
    assert types["conv1"] is types["conv2"] is types["conv3"] is keras.layers.Conv2D
    assert types["bn2"] is types["dense1_bn"] is keras.layers.BatchNormalization
    expected = np.load(DATA / "legacy_fast_layers.npz")
    np.testing.assert_allclose(model.inference_logits(expected["x"]).numpy(), expected["logits"], rtol=1e-5, atol=1e-6)
    resaved = json.dumps(keras.saving.serialize_keras_object(model))
    assert "InputConv2D" not in resaved and "FusedBatchNormalization" not in resaved
