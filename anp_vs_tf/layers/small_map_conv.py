"""`SmallMapConv2D`: a Conv2D for feature maps smaller than its kernel, run as one matmul.

VGG-16 on 32x32 images ends in three 3x3 convolutions over 2x2 maps of 512 channels.
With "same" padding, 5 of the 9 taps of every output position read zeros, and oneDNN's
convolution kernels do poorly on such a map: on this 2-core CPU in bfloat16 (batch 128)
each layer takes ~6.7 ms forward and ~27 ms with both gradients. Seen as a linear map
from the H*W*C_in inputs to the H*W*C_out outputs, the same convolution is one matmul
with a (H*W*C_in, H*W*C_out) matrix gathered from the kernel, H*W / (kh*kw) of the
convolution's multiply-adds (4/9 here): ~3 ms forward and ~8 ms with both gradients.
Every attack step runs these layers forward and backward, so the saving is paid out
k + 2 times per adversarial training step.

The layer is otherwise a `keras.layers.Conv2D` (same weights, config and results to
float rounding), and the matmul is used only where it applies and costs fewer
multiply-adds: TensorFlow, channels_last, stride 1, no dilation, one group, "same"
padding, a static map with H*W < kh*kw. `export.compact` turns it back into a plain
Conv2D.
"""

import keras
import numpy as np
import tensorflow as tf


def dense_is_cheaper(map_shape, kernel_size):
    """True if a stride-1 'same' convolution over an (H, W) map costs fewer multiply-adds as a matmul."""
    height, width = map_shape
    return height is not None and width is not None and height * width < kernel_size[0] * kernel_size[1]


def _tap_indices(height, width, kh, kw):
    """(H*W, H*W) int array: the kernel tap that links input position p to output position q,
    or kh*kw (a zero tap) where the two are further apart than the kernel reaches."""
    top, left = (kh - 1) // 2, (kw - 1) // 2  # TensorFlow's 'same' padding, stride 1
    a, b = np.divmod(np.arange(height * width), width)  # row and column of each position
    row_tap = a[:, None] - a[None, :] + top
    col_tap = b[:, None] - b[None, :] + left
    inside = (row_tap >= 0) & (row_tap < kh) & (col_tap >= 0) & (col_tap < kw)
    return np.where(inside, row_tap * kw + col_tap, kh * kw).astype(np.int32)


def conv2d_as_matmul(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, "SAME") for a static (H, W) map, as one matmul."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    kh, kw, _, filters = kernel.shape
    taps = tf.reshape(kernel, [kh * kw, channels, filters])
    taps = tf.concat([taps, tf.zeros_like(taps[:1])], axis=0)
    matrix = tf.gather(taps, _tap_indices(height, width, kh, kw))  # (HW_in, HW_out, C_in, C_out)
    matrix = tf.reshape(tf.transpose(matrix, [0, 2, 1, 3]), [height * width * channels, -1])
    y = tf.matmul(tf.reshape(x, [-1, height * width * channels]), matrix)
    return tf.reshape(y, [-1, height, width, filters])


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class SmallMapConv2D(keras.layers.Conv2D):
    """A `keras.layers.Conv2D` computed as one matmul where the map is smaller than the kernel."""

    def _dense_path(self, inputs):
        return (
            keras.backend.backend() == "tensorflow"
            and self.data_format == "channels_last"
            and tuple(self.strides) == (1, 1)
            and tuple(self.dilation_rate) == (1, 1)
            and self.groups == 1
            and self.padding == "same"
            and len(inputs.shape) == 4
            and dense_is_cheaper(inputs.shape[1:3], self.kernel_size)
        )

    def convolution_op(self, inputs, kernel):
        if not self._dense_path(inputs):
            return super().convolution_op(inputs, kernel)
        kernel = tf.convert_to_tensor(kernel)
        return conv2d_as_matmul(tf.cast(inputs, kernel.dtype), kernel)
