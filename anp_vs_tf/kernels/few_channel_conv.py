"""Convolutions of a few-channel input (the image) whose input gradient is fast on some CPUs.

Every PGD step needs the loss gradient with respect to the image, and so the first
convolution's gradient with respect to *its* input, which training never needs. With
an input of 1 or 3 channels that gradient is a convolution with 1 or 3 output
channels, a shape oneDNN's backward-data kernel handled poorly on an AVX2 CPU (AMD Zen
3): for LeNet-5-Caffe's conv1 on a batch of 128 it took about 5x the forward
convolution, ~40% of an attack step. Written as one matmul (dy times the kernel: every
output position's columns) followed by col2im (summing the kh*kw shifted column
planes), it was about 2x faster.

Where such a convolution is followed by a ReLU and a 2x2 max-pool (LeNet-5's conv1 and
pool1), an attack needs only the pooled output, and `conv_relu_max_pool` computes it
without the full-resolution map.

These are functions of tensors, not layers: `kernels.choose` decides where they run
(the attack's folded network, `models.folding`), and no saved model holds them.
"""

import keras
import numpy as np
import tensorflow as tf

MAX_FAST_CHANNELS = 4


def _col2im_input_gradient(dy, kernel, padding, input_height, input_width):
    """d(loss)/d(input) of a stride-1 convolution, from d(loss)/d(output) `dy`."""
    kh, kw, channels, filters = kernel.shape
    n, out_h, out_w = tf.shape(dy)[0], tf.shape(dy)[1], tf.shape(dy)[2]
    columns = tf.matmul(tf.reshape(dy, [-1, filters]), tf.reshape(kernel, [-1, filters]), transpose_b=True)
    columns = tf.reshape(columns, [n, out_h, out_w, kh, kw, channels])
    # Sum the shifted planes along the width, then along the height (2 x k pads, not k^2).
    rows = tf.add_n([tf.pad(columns[:, :, :, :, j], [[0, 0], [0, 0], [j, kw - 1 - j], [0, 0], [0, 0]])
                     for j in range(kw)])
    padded = tf.add_n([tf.pad(rows[:, :, :, i], [[0, 0], [i, kh - 1 - i], [0, 0], [0, 0]])
                       for i in range(kh)])
    if padding == "SAME":  # the gradient of the zero padding TensorFlow added is dropped
        top, left = (kh - 1) // 2, (kw - 1) // 2
        padded = padded[:, top:top + input_height, left:left + input_width]
    return padded


def applies_to_input(layer, input_shape):
    """True if `layer`'s convolution over inputs of `input_shape` is one these functions compute."""
    return (is_plain_stride1_conv(layer) and None not in tuple(input_shape[1:])
            and input_shape[-1] <= MAX_FAST_CHANNELS)


def conv2d_fast_input_gradient(x, kernel, padding):
    """tf.nn.conv2d (stride 1) with the col2im input gradient; the kernel gradient is TF's own."""
    padding = padding.upper()

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(dy):
            dx = _col2im_input_gradient(dy, kernel, padding, x.shape[1], x.shape[2])
            dkernel = tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=[1, 1, 1, 1],
                padding=padding)
            return dx, dkernel

        return tf.nn.conv2d(x, kernel, 1, padding), gradient

    return convolve(x, kernel)


def conv_relu_max_pool(x, kernel, bias, padding):
    """max_pool2d(relu(conv2d(x, kernel, 1, padding) + bias), 2, 2, "VALID"), values and
    input gradient, for a few-channel static input.

    With x rearranged into 2x2 blocks (space_to_depth), the four outputs (a, c) that one
    pooling window takes are the 4*F output channels of one convolution over the blocks
    with a (kh//2 + 1, kw//2 + 1, 4C, 4F) kernel gathered from `kernel`; the window's
    max is a max over those channel groups, the bias and ReLU (monotone) follow on the
    pooled map. For LeNet-5's conv1 + pool1 (64 images, forward and input gradient) this
    took ~6 ms against ~10 for the convolution, ReLU and max-pool, on an AVX2 CPU: the
    oneDNN kernels with 1 input channel and the max-pool gradient over the 24x24 map were
    the slow parts. ~1.4x the multiply-adds for a 5x5 kernel (4 (kh//2+1)^2 / kh^2).
    """
    kh, kw, channels, filters = kernel.shape
    if padding.upper() == "SAME":
        x = tf.pad(x, [[0, 0], same_padding(kh), same_padding(kw), [0, 0]])
    height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1  # the convolution's output
    bh, bw = kh // 2 + 1, kw // 2 + 1  # the block kernel
    rows, cols = height // 2 + bh - 1, width // 2 + bw - 1  # the blocks the pooled map reads
    x = tf.pad(x, [[0, 0], [0, max(0, 2 * rows - x.shape[1])], [0, max(0, 2 * cols - x.shape[2])], [0, 0]])
    blocks = tf.nn.space_to_depth(x[:, :2 * rows, :2 * cols], 2)  # channel (r, s, c): pixel (2P + r, 2Q + s)
    taps = tf.concat([tf.reshape(kernel, [kh * kw, channels, filters]),
                      tf.zeros([1, channels, filters], kernel.dtype)], axis=0)
    block_kernel = tf.gather(taps, _block_taps(kh, kw))  # (bh, bw, r, s, a, c, C, F)
    block_kernel = tf.reshape(tf.transpose(block_kernel, [0, 1, 2, 3, 6, 4, 5, 7]),
                              [bh, bw, 4 * channels, 4 * filters])
    y = tf.nn.conv2d(blocks, block_kernel, 1, "VALID")  # channel (a, c, f): output (2p + a, 2q + c)
    pooled = _max_over_phases(tf.reshape(y, [-1, height // 2, width // 2, 4, filters]))
    if bias is not None:
        pooled = tf.nn.bias_add(pooled, bias)
    return tf.nn.relu(pooled)


def _block_taps(kh, kw):
    """(bh, bw, 2, 2, 2, 2) indices into the kh*kw kernel taps (kh*kw: a zero tap): block
    tap (P, Q) links input pixel (2P + r, 2Q + s) of a block to output (a, c) through
    kernel tap (2P + r - a, 2Q + s - c)."""
    P, Q, r, s, a, c = np.meshgrid(*(np.arange(n) for n in (kh // 2 + 1, kw // 2 + 1, 2, 2, 2, 2)), indexing="ij")
    u, v = 2 * P + r - a, 2 * Q + s - c
    return np.where((u >= 0) & (u < kh) & (v >= 0) & (v < kw), u * kw + v, kh * kw).astype(np.int32)


@tf.custom_gradient
def _max_over_phases(y):
    """Max over axis 3; the gradient goes to the first maximum, as max-pooling's does
    (a reduce_max would split it among ties: the zero background of MNIST has many)."""
    def gradient(upstream):
        first = tf.one_hot(tf.argmax(y, axis=3), 4, axis=3, dtype=upstream.dtype)
        return first * upstream[:, :, :, None, :]

    return tf.reduce_max(y, axis=3), gradient


def same_padding(k):
    """TensorFlow's 'same' padding of a size-k kernel at stride 1: (before, after)."""
    return (k - 1) // 2, k - 1 - (k - 1) // 2


def is_plain_stride1_conv(layer):
    """True for a Conv2D whose op is tf.nn.conv2d at stride 1 (TensorFlow, channels_last,
    no dilation, one group): the case the faster convolutions of this package rewrite."""
    return (
        keras.backend.backend() == "tensorflow"
        and layer.data_format == "channels_last"
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
    )
