"""`FusedBatchNormalization`: Keras' batch norm, trained through TensorFlow's fused kernel.

Keras 3's `BatchNormalization` computes a training-mode pass from generic ops: it casts
a bfloat16 input to float32, takes the moments, normalizes and casts back, and the
gradient retraces all of it, element by element. For VGG-16's first block (batch 128,
32x32x64, bfloat16) that is ~24 ms forward and backward on this 2-core CPU, against
~6 ms for TensorFlow's `FusedBatchNormV3`, which oneDNN runs as one pass each way. An
adversarial training step normalizes two views, so this is worth ~0.15 s of a ~3 s
VGG-16 AT step (benchmarks/README.md).

The layer is otherwise a `keras.layers.BatchNormalization`: same weights, config,
inference pass and moving-average update. The fused kernel reports the batch variance
with Bessel's correction, n / (n - 1); it is undone before the update, so the moving
statistics are Keras' own. The fused path is used only where it applies: TensorFlow,
training with trainable weights, the last axis normalized, no mask, no renormalization.
`export.compact` turns the layer back into a plain BatchNormalization.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """A `keras.layers.BatchNormalization` whose training pass is one fused op each way."""

    def _fused_path(self, inputs, training, mask):
        return (
            keras.backend.backend() == "tensorflow"
            and training is True
            and self.trainable
            and mask is None
            and not self.renorm
            and self.axis in (-1, len(inputs.shape) - 1)
            and len(inputs.shape) in (2, 4)
            and inputs.dtype in (tf.float32, tf.bfloat16)
            and self.epsilon >= 1.001e-5  # the kernel's minimum
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused_path(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        x = tf.reshape(inputs, [-1, 1, 1, channels]) if len(inputs.shape) == 2 else inputs
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        y, mean, corrected_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=tf.cast(x, self.compute_dtype), scale=gamma, offset=beta,
            mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=self.epsilon,
            data_format="NHWC", is_training=True)
        n = tf.cast(tf.size(x) // channels, tf.float32)
        variance = corrected_variance * (n - 1.0) / tf.maximum(n, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.reshape(y, tf.shape(inputs)) if len(inputs.shape) == 2 else y
