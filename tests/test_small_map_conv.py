"""SmallMapConv2D: a 'same' convolution over a small map: as one matmul, or with a matmul kernel gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import models, precision
from anp_vs_tf.layers import SmallMapConv2D
from anp_vs_tf.layers.small_map_conv import (
    SMALL_MAP,
    _tap_indices,
    conv2d_as_matmul,
    conv2d_matmul_kernel_gradient,
    dense_is_cheaper,
)


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
    (conv2d_matmul_kernel_gradient, (4, 4), (3, 3)), (conv2d_matmul_kernel_gradient, (8, 8), (3, 3)),
    (conv2d_matmul_kernel_gradient, (5, 7), (3, 4)),  # TF pads more at the bottom/right
    (conv2d_matmul_kernel_gradient, (6, 6), (2, 2)),
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


def test_layer_equals_conv2d_and_uses_the_matmul_only_where_it_applies():
    x = tf.random.stateless_uniform((4, 2, 2, 8), [0, 4])
    plain, small = keras.layers.Conv2D(5, 3, padding="same"), SmallMapConv2D(5, 3, padding="same")
    plain.build(x.shape)
    small.build(x.shape)
    small.set_weights(plain.get_weights())
    np.testing.assert_allclose(small(x).numpy(), plain(x).numpy(), atol=1e-5)
    assert "MatMul" in ops_of(small, x) and "Conv2D" not in ops_of(small, x)
    middle = tf.random.stateless_uniform((4, 4, 4, 8), [0, 5])  # float32: Keras' own conv
    assert "Conv2D" in ops_of(small, middle) and "MatMul" not in ops_of(small, middle, gradient=True)
    np.testing.assert_allclose(small(middle).numpy(), plain(middle).numpy(), atol=1e-5)
    with precision.dtype_policy(precision.MIXED_POLICY):  # bfloat16: its kernel gradient by matmuls
        mixed = SmallMapConv2D(5, 3, padding="same")
        mixed.build(middle.shape)
        large = SmallMapConv2D(5, 3, padding="same")
    assert "Conv2D" in ops_of(mixed, middle) and "MatMul" in ops_of(mixed, middle, gradient=True)
    big = tf.random.stateless_uniform((4, 17, 17, 8), [0, 6])  # 289 > SMALL_MAP positions: Keras' own conv
    large.build(big.shape)
    assert SMALL_MAP < 17 * 17 and "MatMul" not in ops_of(large, big, gradient=True)


def ops_of(layer, x, gradient=False):
    def run(x):
        if not gradient:
            return layer(x)
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(layer(x))
        return tape.gradient(y, layer.kernel)

    return {op.type for op in tf.function(run).get_concrete_function(x).graph.get_operations()}


def test_vgg16_uses_it_from_its_8x8_maps_on_and_round_trips():
    backbone = models.vgg16()
    small = [layer.name for layer in backbone.layers if type(layer) is SmallMapConv2D]
    assert small == [f"conv{i}" for i in range(5, 14)]
    restored = keras.Model.from_config(backbone.get_config())
    assert type(restored.get_layer("conv12")) is SmallMapConv2D
