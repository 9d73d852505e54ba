"""InputConv2D: a Conv2D whose input gradient is computed by matmul + col2im; and its
convolution, ReLU and 2x2 max-pool computed over 2x2 blocks of the input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import models
from anp_vs_tf.layers import InputConv2D
from anp_vs_tf.layers.input_conv import _block_taps, conv_relu_max_pool


@pytest.mark.parametrize("shape, filters, kernel, padding", [
    ((8, 28, 28, 1), 20, 5, "valid"),     # LeNet-5-Caffe's conv1
    ((4, 32, 32, 3), 16, 3, "same"),      # VGG-16's conv1
    ((4, 9, 11, 2), 5, (3, 4), "same"),   # uneven kernel: TF pads more at the bottom/right
    ((4, 9, 11, 2), 5, (3, 4), "valid"),
])
def test_outputs_and_gradients_equal_keras_conv2d(shape, filters, kernel, padding):
    x = tf.random.stateless_uniform(shape, [0, 1])
    plain = keras.layers.Conv2D(filters, kernel, padding=padding)
    fast = InputConv2D(filters, kernel, padding=padding)
    plain.build(shape)
    fast.build(shape)
    fast.set_weights(plain.get_weights())
    upstream = tf.random.stateless_normal(plain.compute_output_shape(shape), [0, 2])

    def output_and_gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        return [y] + tape.gradient(loss, [x] + layer.trainable_variables)

    for a, b in zip(output_and_gradients(plain), output_and_gradients(fast)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5, rtol=1e-5)


def test_other_shapes_fall_back_to_conv2d_and_the_layer_round_trips():
    wide = InputConv2D(8, 3, strides=2)  # stride 2 and 16 channels: Keras' own path
    x = tf.random.stateless_uniform((2, 9, 9, 16), [0, 3])
    y = wide(x)
    expected = tf.nn.conv2d(x, wide.kernel, 2, "VALID") + wide.bias
    np.testing.assert_allclose(y.numpy(), expected.numpy(), atol=1e-5)
    backbone = models.lenet5_caffe()
    assert type(backbone.get_layer("conv1")) is InputConv2D
    restored = keras.Model.from_config(backbone.get_config())
    assert type(restored.get_layer("conv1")) is InputConv2D


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

    def three_ops(x):
        z = tf.nn.conv2d(x, w, 1, padding)
        return tf.nn.max_pool2d(tf.nn.relu(z if b is None else z + b), 2, 2, "VALID")

    def output_and_gradient(f):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
            loss = tf.reduce_sum(y * tf.random.stateless_normal(y.shape, [0, 7]))
        return y.numpy(), tape.gradient(loss, x).numpy()

    (expected, expected_gradient) = output_and_gradient(three_ops)
    (pooled, gradient) = output_and_gradient(lambda x: conv_relu_max_pool(x, w, b, padding))
    assert pooled.shape == expected.shape
    np.testing.assert_allclose(pooled, expected, atol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-5)


def test_block_taps_by_hand():
    # A 1-D view: kernel of 3 taps; block tap P links pixel 2P + r to output a through tap 2P + r - a.
    taps = _block_taps(3, 1)[:, 0, :, 0, :, 0]  # (P, r, a)
    np.testing.assert_array_equal(taps, [[[0, 3], [1, 0]],    # P=0: r=0 -> a=0 tap 0; r=1 -> taps 1, 0
                                         [[2, 1], [3, 2]]])   # P=1: r=0 -> taps 2, 1; r=1 -> a=1 tap 2
