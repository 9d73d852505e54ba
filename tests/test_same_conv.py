"""SameConv2D: a stride-1 'same' convolution whose input gradient is a forward convolution,
over a map smaller than the kernel one matmul, and in bfloat16 with a matmul kernel gradient."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import models, precision
from anp_vs_tf.layers import SameConv2D, SmallMapConv2D
from anp_vs_tf.layers.same_conv import (
    SMALL_MAP,
    _tap_indices,
    conv2d_as_matmul,
    conv2d_same,
    dense_is_cheaper,
)

matmul_kernel_gradient = functools.partial(conv2d_same, kernel_gradient_by_matmuls=True)


def test_tap_indices_by_hand():
    # 2x2 map, 3x3 kernel; positions 0 1 / 2 3; taps 0..8 row-major, 9 = none.
    # Output q reads input p through tap (p_row - q_row + 1, p_col - q_col + 1).
    expected = np.array([
        # q=0 q=1 q=2 q=3
        [4, 3, 1, 0],  # p=0 (0,0)
        [5, 4, 2, 1],  # p=1 (0,1)
        [7, 6, 4, 3],  # p=2 (1,0)
        [8, 7, 5, 4],  # p=3 (1,1)
    ])
    np.testing.assert_array_equal(_tap_indices(2, 2, 3, 3), expected)
    # A 1x3 map and a 1x2 kernel: TF's 'same' pads 0 left, 1 right, so q reads q and q+1.
    np.testing.assert_array_equal(_tap_indices(1, 3, 1, 2), [[0, 2, 2], [1, 0, 2], [2, 1, 0]])


def test_dense_is_cheaper_counts_multiply_adds():
    assert dense_is_cheaper((2, 2), (3, 3))      # 4 positions < 9 taps: VGG-16's last block
    assert not dense_is_cheaper((3, 3), (3, 3))  # as many: nothing to gain
    assert not dense_is_cheaper((4, 4), (3, 3))
    assert not dense_is_cheaper((None, 2), (3, 3))


@pytest.mark.parametrize("conv, map_shape, kernel", [
    (conv2d_as_matmul, (2, 2), (3, 3)), (conv2d_as_matmul, (1, 1), (3, 3)), (conv2d_as_matmul, (2, 3), (3, 5)),
    (conv2d_as_matmul, (1, 3), (2, 2)), (conv2d_as_matmul, (2, 1), (5, 1)),
    (conv2d_same, (4, 4), (3, 3)), (conv2d_same, (9, 8), (5, 3)), (conv2d_same, (1, 1), (3, 3)),
    (conv2d_same, (5, 7), (3, 4)), (conv2d_same, (6, 6), (2, 2)),  # TF pads more at the bottom/right
    (matmul_kernel_gradient, (4, 4), (3, 3)), (matmul_kernel_gradient, (8, 8), (3, 3)),
    (matmul_kernel_gradient, (5, 7), (3, 4)), (matmul_kernel_gradient, (6, 6), (2, 2)),
])
def test_fast_paths_equal_tf_conv2d_with_gradients(conv, map_shape, kernel):
    x = tf.random.stateless_normal((3,) + map_shape + (4,), [0, 1])
    w = tf.random.stateless_normal(kernel + (4, 6), [0, 2])
    upstream = tf.random.stateless_normal((3,) + map_shape + (6,), [0, 3])

    def output_and_gradients(conv):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = conv(x, w)
            loss = tf.reduce_sum(y * upstream)
        return [y] + tape.gradient(loss, [x, w])

    reference = output_and_gradients(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
    for a, b in zip(reference, output_and_gradients(conv)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5, rtol=1e-5)


def test_layer_equals_conv2d_and_takes_each_path_where_it_applies():
    plain, same = keras.layers.Conv2D(5, 3, padding="same"), SameConv2D(5, 3, padding="same")
    for layer in (plain, same):
        layer.build((None, None, None, 8))
    same.set_weights(plain.get_weights())
    tiny = tf.random.stateless_uniform((4, 2, 2, 8), [0, 4])  # 4 positions < 9 taps: one matmul
    np.testing.assert_allclose(same(tiny).numpy(), plain(tiny).numpy(), atol=1e-5)
    assert "MatMul" in ops_of(same, tiny) and "Conv2D" not in ops_of(same, tiny, gradient=True)
    # Float32, larger maps: forward convolutions both ways, TensorFlow's kernel gradient.
    for x in (tf.random.stateless_uniform((4, 4, 4, 8), [0, 5]), tf.random.stateless_uniform((4, 17, 17, 8), [0, 6])):
        np.testing.assert_allclose(same(x).numpy(), plain(x).numpy(), atol=1e-5)
        ops = ops_of(same, x, gradient=True)
        assert "Conv2DBackpropInput" not in ops and {"Conv2D", "Conv2DBackpropFilter"} <= ops and "MatMul" not in ops
        assert "Conv2DBackpropInput" in ops_of(plain, x, gradient=True)  # what it replaces
    with precision.dtype_policy(precision.MIXED_POLICY):  # bfloat16: the kernel gradient by matmuls up to SMALL_MAP
        mixed = SameConv2D(5, 3, padding="same")
        mixed.build((None, None, None, 8))
    middle, big = tf.random.stateless_uniform((4, 8, 8, 8), [0, 7]), tf.random.stateless_uniform((4, 9, 9, 8), [0, 8])
    assert SMALL_MAP == 8 * 8 and "MatMul" in ops_of(mixed, middle, gradient=True)
    assert "MatMul" not in ops_of(mixed, big, gradient=True) and "Conv2DBackpropFilter" in ops_of(mixed, big, gradient=True)
    strided = SameConv2D(5, 3, strides=2, padding="same")  # not stride 1: Keras' own op
    strided.build((None, None, None, 8))
    assert "Conv2DBackpropInput" in ops_of(strided, big, gradient=True)


def ops_of(layer, x, gradient=False):
    """Op types of layer(x), or with gradient=True of the gradients to the input and the kernel."""
    def run(x):
        if not gradient:
            return layer(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x))
        return tape.gradient(y, [x, layer.kernel])

    return {op.type for op in tf.function(run).get_concrete_function(x).graph.get_operations()}


def test_vgg16_uses_it_after_its_first_layer_and_round_trips():
    backbone = models.vgg16()
    same = [layer.name for layer in backbone.layers if type(layer) is SameConv2D]
    assert same == [f"conv{i}" for i in range(2, 14)]
    restored = keras.Model.from_config(backbone.get_config())
    assert type(restored.get_layer("conv12")) is SameConv2D


def test_models_saved_with_the_old_name_still_load(tmp_path):
    inputs = keras.Input((4, 4, 3))
    old = keras.Model(inputs, SmallMapConv2D(2, 3, padding="same", name="conv")(inputs))
    old.save(tmp_path / "old.keras")
    restored = keras.models.load_model(tmp_path / "old.keras")
    x = tf.random.stateless_uniform((2, 4, 4, 3), [0, 9])
    assert isinstance(restored.get_layer("conv"), SameConv2D)
    np.testing.assert_allclose(restored(x).numpy(), old(x).numpy())
