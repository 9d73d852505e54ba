"""InputConv2D: a Conv2D whose input gradient is computed by matmul + col2im."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import models
from anp_vs_tf.layers import InputConv2D


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
