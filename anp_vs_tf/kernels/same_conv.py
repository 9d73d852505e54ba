"""A stride-1 'same' convolution whose passes are rewritten where oneDNN was slow on a CPU.

VGG-16's conv2-conv13 are 3x3 'same' convolutions over maps from 32x32 down to 2x2. An
attack step runs each of them forward and back to its input, k times per adversarial
training step. Measured on 2-core CPUs, batch 128, three of TensorFlow's kernels are slow:

- **The input gradient** (Conv2DBackpropInput). On an AVX2 CPU (AMD Zen 3), in float32,
  for VGG-16's 9.7-GFLOP layers it takes 185 / 152 / 151 / 452 ms over 32x32 / 16x16 /
  8x8 / 4x4 maps, against 114 / 71 / 74 / 70 ms for the forward convolution (and
  829 ms against 19 over 2x2). It is the transpose of the same linear map: a
  convolution of the output gradient with the kernel flipped in space and its two
  channel axes swapped, padded the mirrored way (`transposed_kernel`), which runs as a
  forward convolution: 99 / 75 / 71 / 60 ms. It is used at every map size.
- **Over a map smaller than the kernel** (at 2x2, 5 of the 9 taps of every output read
  zeros) the convolution is one matmul with a matrix gathered from the kernel,
  H*W / (kh*kw) of the multiply-adds (4/9 here): in bfloat16 ~3 ms forward and ~8 ms
  with both gradients, against ~6.7 and ~27 ms.
- **In bfloat16, the kernel gradient** (Conv2DBackpropFilter) runs no faster than in
  float32, half the speed of the forward convolution on a CPU with bfloat16 arithmetic:
  28 ms for 4x4x512 -> 512 against 13 ms as kh*kw matmuls of the shifted input with the
  output gradient. That held up to 8x8 maps (SMALL_MAP positions) inside training
  steps; over larger maps, and in float32, the matmuls were slower.

Each is exact to float rounding where it applies (TensorFlow, channels_last, stride 1,
no dilation, one group, "same" padding, a static map: `applies_to`), and each is a
function of tensors: `kernels.choose` decides where it runs, and no saved model holds it.
"""

import numpy as np
import tensorflow as tf

from anp_vs_tf.kernels.few_channel_conv import is_plain_stride1_conv, same_padding

SMALL_MAP = 64  # positions (8x8): up to here the bfloat16 kernel gradient by matmuls measured faster


def dense_is_cheaper(map_shape, kernel_size):
    """True if a stride-1 'same' convolution over an (H, W) map costs fewer multiply-adds as a matmul."""
    height, width = map_shape
    return height is not None and width is not None and height * width < kernel_size[0] * kernel_size[1]


def _tap_indices(height, width, kh, kw):
    """(H*W, H*W) int array: the kernel tap that links input position p to output position q,
    or kh*kw (a zero tap) where the two are further apart than the kernel reaches."""
    top, left = same_padding(kh)[0], same_padding(kw)[0]
    a, b = np.divmod(np.arange(height * width), width)  # row and column of each position
    row_tap = a[:, None] - a[None, :] + top
    col_tap = b[:, None] - b[None, :] + left
    inside = (row_tap >= 0) & (row_tap < kh) & (col_tap >= 0) & (col_tap < kw)
    return np.where(inside, row_tap * kw + col_tap, kh * kw).astype(np.int32)


def conv2d_as_matmul(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, "SAME") for a static (H, W) map, as one matmul.

    The matrix is gathered straight into (C_in, HW_in) x (HW_out, C_out) order and the
    input is transposed to match: the input is small, and the matrix (151 MB for 2x2x512
    -> 512) is not."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    kh, kw, _, filters = kernel.shape
    taps = tf.reshape(kernel, [kh * kw, channels, filters])
    taps = tf.transpose(tf.concat([taps, tf.zeros_like(taps[:1])], axis=0), [1, 0, 2])  # (C_in, taps, C_out)
    matrix = tf.gather(taps, _tap_indices(height, width, kh, kw), axis=1)  # (C_in, HW_in, HW_out, C_out)
    matrix = tf.reshape(matrix, [channels * height * width, height * width * filters])
    rows = tf.transpose(tf.reshape(x, [-1, height * width, channels]), [0, 2, 1])  # (N, C_in, HW_in)
    y = _matmul_by_large(tf.reshape(rows, [-1, channels * height * width]), matrix)
    return tf.reshape(y, [-1, height, width, filters])


@tf.custom_gradient
def _matmul_by_large(a, matrix):
    """a @ matrix, whose gradient to `a` is (matrix @ dy^T)^T: with a (2048, 2048) matrix,
    dy @ matrix^T (TensorFlow's own) took 36 ms against 10 on an AVX2 CPU."""
    def gradient(dy):
        return tf.transpose(tf.matmul(matrix, dy, transpose_b=True)), tf.matmul(a, dy, transpose_a=True)

    return tf.matmul(a, matrix), gradient


def transposed_kernel(kernel):
    """The kernel of the transposed convolution: flipped in space, input and output channels swapped.

    tf.reverse, not kernel[::-1, ::-1]: a negative-stride slice of a 3x3x512x512 kernel
    took 30 ms against 3, and it runs in every attack step."""
    return tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])


def conv2d_same(x, kernel, kernel_gradient_by_matmuls=False):
    """tf.nn.conv2d(x, kernel, 1, "SAME") whose input gradient is a forward convolution.

    The kernel gradient is TensorFlow's own, or with kernel_gradient_by_matmuls kh*kw
    matmuls of the shifted input with the output gradient (static map only).
    """
    kh, kw, channels, filters = kernel.shape
    # The transpose's padding mirrors the forward's: TF pads an even kernel more after.
    mirrored = [[0, 0], same_padding(kh)[::-1], same_padding(kw)[::-1], [0, 0]]

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(dy):
            dx = tf.nn.conv2d(dy, transposed_kernel(kernel), 1, mirrored)
            if not kernel_gradient_by_matmuls:
                return dx, tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME")
            height, width = x.shape[1], x.shape[2]
            padded = tf.pad(x, [[0, 0], same_padding(kh), same_padding(kw), [0, 0]])
            dy_rows = tf.reshape(dy, [-1, filters])
            taps = [tf.matmul(tf.reshape(padded[:, i:i + height, j:j + width], [-1, channels]), dy_rows,
                              transpose_a=True)
                    for i in range(kh) for j in range(kw)]
            return dx, tf.reshape(tf.stack(taps), [kh, kw, channels, filters])

        return tf.nn.conv2d(x, kernel, 1, "SAME"), gradient

    return convolve(x, kernel)


def applies_to(layer, input_shape):
    """True if `layer` is a convolution `same_convolution` computes over inputs of `input_shape`."""
    return (is_plain_stride1_conv(layer) and layer.padding == "same" and len(input_shape) == 4
            and None not in tuple(input_shape[1:]))


def same_convolution(x, kernel, kernel_size):
    """tf.nn.conv2d(x, kernel, 1, "SAME") by the cheapest rewrite for the map size and dtype."""
    if dense_is_cheaper(x.shape[1:3], kernel_size):
        return conv2d_as_matmul(x, kernel)
    small = x.shape[1] * x.shape[2] <= SMALL_MAP
    return conv2d_same(x, kernel, kernel_gradient_by_matmuls=small and x.dtype == tf.bfloat16)
