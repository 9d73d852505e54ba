"""`SmallMapConv2D`: a Conv2D for small feature maps, where oneDNN's kernels do poorly.

VGG-16 on 32x32 images ends in three 3x3 convolutions over 2x2 maps of 512 channels,
after three over 4x4 and three over 8x8 maps. Measured on this 2-core CPU in bfloat16
(batch 128), two things are slow there:

- Over a map smaller than the kernel ("same" padding: at 2x2, 5 of the 9 taps of
  every output read zeros) the convolution takes ~6.7 ms forward and ~27 ms with both
  gradients. Seen as a linear map from the H*W*C_in inputs to the H*W*C_out outputs it
  is one matmul with a matrix gathered from the kernel, H*W / (kh*kw) of the
  convolution's multiply-adds (4/9 here): ~3 ms forward, ~8 ms with both gradients.
- In bfloat16, the kernel gradient (Conv2DBackpropFilter) runs no faster than in
  float32, about half the speed of the forward convolution: 28 ms for 4x4x512 -> 512
  against 13 ms as kh*kw matmuls of the shifted input with the output gradient. Inside
  a training step the difference is larger still: with the matmuls over the 8x8 and
  4x4 maps a VGG-16 AT step took 2.84 s instead of 3.21 s. Adding the 16x16 maps gave
  -3% on the bare step but +2% and +5% on AT and standard training in `fit`; over
  32x32 maps, and in float32, the matmuls were slower. So they are used for bfloat16
  up to SMALL_MAP positions.

Every attack step runs the 2x2 layers forward and backward (the first point pays k + 2
times per adversarial training step); training pays the second, for both views.

The layer is otherwise a `keras.layers.Conv2D` (same weights, config and results to
float rounding). The fast paths are used only where they apply: TensorFlow,
channels_last, stride 1, no dilation, one group, "same" padding, a static map; the
matmul where H*W < kh*kw, else the kernel gradient by matmuls in bfloat16 where
H*W <= SMALL_MAP.
`export.compact` turns the layer back into a plain Conv2D.
"""

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf.layers.input_conv import is_plain_stride1_conv

SMALL_MAP = 64  # positions (8x8): up to here the kernel gradient by matmuls measured faster


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


def _same_padding(k):
    """TensorFlow's 'same' padding of a size-k kernel at stride 1: (before, after)."""
    return (k - 1) // 2, k - 1 - (k - 1) // 2


def conv2d_matmul_kernel_gradient(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, "SAME"), whose kernel gradient is kh*kw matmuls of the
    shifted input with the output gradient; the input gradient is TensorFlow's own."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    kh, kw, _, filters = kernel.shape

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME")
            padded = tf.pad(x, [[0, 0], _same_padding(kh), _same_padding(kw), [0, 0]])
            dy_rows = tf.reshape(dy, [-1, filters])
            taps = [tf.matmul(tf.reshape(padded[:, i:i + height, j:j + width], [-1, channels]), dy_rows,
                              transpose_a=True)
                    for i in range(kh) for j in range(kw)]
            return dx, tf.reshape(tf.stack(taps), [kh, kw, channels, filters])

        return tf.nn.conv2d(x, kernel, 1, "SAME"), gradient

    return convolve(x, kernel)


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class SmallMapConv2D(keras.layers.Conv2D):
    """A `keras.layers.Conv2D` with faster passes over maps of at most SMALL_MAP positions."""

    def _applies(self, inputs):
        return (
            is_plain_stride1_conv(self)
            and self.padding == "same"
            and len(inputs.shape) == 4
            and None not in inputs.shape[1:]
            and inputs.shape[1] * inputs.shape[2] <= SMALL_MAP
        )

    def convolution_op(self, inputs, kernel):
        if not self._applies(inputs):
            return super().convolution_op(inputs, kernel)
        kernel = tf.convert_to_tensor(kernel)
        inputs = tf.cast(inputs, kernel.dtype)
        if dense_is_cheaper(inputs.shape[1:3], self.kernel_size):
            return conv2d_as_matmul(inputs, kernel)
        if inputs.dtype == tf.bfloat16:
            return conv2d_matmul_kernel_gradient(inputs, kernel)
        return super().convolution_op(inputs, kernel)
