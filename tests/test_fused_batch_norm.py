"""FusedBatchNormalization: Keras' batch norm, trained through TensorFlow's fused kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import models, precision
from anp_vs_tf.layers import FusedBatchNormalization


def pair(shape, **kwargs):
    """A Keras BatchNormalization and a FusedBatchNormalization with the same random weights."""
    plain, fused = keras.layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    plain.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in plain.get_weights()]
    plain.set_weights(weights)
    fused.set_weights(weights)
    return plain, fused


def step(layer, x, upstream, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return [y] + tape.gradient(loss, [x] + layer.trainable_variables)


@pytest.mark.parametrize("shape, kwargs", [
    ((16, 5, 5, 6), {}),
    ((32, 7), {}),  # a dense layer's output
    ((16, 3, 3, 4), dict(center=False, momentum=0.9, epsilon=1e-2)),
    ((16, 3, 3, 4), dict(scale=False)),
])
def test_training_step_equals_keras_batch_norm(shape, kwargs):
    x = tf.random.stateless_normal(shape, [0, 1]) * 3.0 + 1.0
    upstream = tf.random.stateless_normal(shape, [0, 2])
    plain, fused = pair(shape, **kwargs)
    graph = tf.function(lambda x: fused(x, training=True)).get_concrete_function(x).graph
    assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}
    for a, b in zip(step(plain, x, upstream), step(fused, x, upstream)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4, rtol=1e-4)
    # Moving statistics: Keras' update with the *population* variance of the batch.
    for a, b in zip(plain.non_trainable_variables, fused.non_trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-6, rtol=1e-6)
    axes = tuple(range(len(shape) - 1))
    momentum = fused.momentum
    x_np = x.numpy().astype(np.float64)
    fresh = FusedBatchNormalization(**kwargs)
    fresh.build(shape)
    fresh(x, training=True)
    np.testing.assert_allclose(fresh.moving_variance.numpy(),
                               momentum * 1.0 + (1 - momentum) * x_np.var(axis=axes), rtol=1e-5)
    np.testing.assert_allclose(fresh.moving_mean.numpy(), (1 - momentum) * x_np.mean(axis=axes),
                               rtol=1e-5, atol=1e-7)


def test_inference_and_frozen_layers_are_keras_own():
    x = tf.random.stateless_normal((8, 3, 3, 4), [0, 3])
    upstream = tf.random.stateless_normal((8, 3, 3, 4), [0, 4])
    plain, fused = pair(x.shape)
    for a, b in zip(step(plain, x, upstream, training=False), step(fused, x, upstream, training=False)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-6)
    fused.trainable = False  # a frozen batch norm uses its moving statistics, as in Keras
    plain.trainable = False
    np.testing.assert_allclose(fused(x, training=True).numpy(), plain(x, training=True).numpy(), atol=1e-6)


def test_bfloat16_training_is_close_to_keras():
    x = tf.random.stateless_normal((64, 6, 6, 8), [0, 5]) * 2.0
    upstream = tf.random.stateless_normal(x.shape, [0, 6])
    with precision.dtype_policy(precision.MIXED_POLICY):
        plain, fused = pair(x.shape)
    out = step(fused, x, upstream)
    assert out[0].dtype == tf.bfloat16
    for a, b in zip(step(plain, x, upstream), out):
        a, b = tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy()
        np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())  # 8-bit mantissa
    for a, b in zip(plain.non_trainable_variables, fused.non_trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-3)


def test_vgg16_uses_it_and_round_trips():
    backbone = models.vgg16()
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 15 and all(type(layer) is FusedBatchNormalization for layer in norms)
    restored = keras.Model.from_config(backbone.get_config())
    assert type(restored.get_layer("bn1")) is FusedBatchNormalization
