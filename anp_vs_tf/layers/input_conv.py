"""`InputConv2D`: a Conv2D for the network's input, whose input gradient is fast on CPU.

Every PGD step needs the loss gradient with respect to the image, and so the first
convolution's gradient with respect to *its* input, which training never needs. With
an input of 1 or 3 channels that gradient is a convolution with 1 or 3 output
channels, a shape oneDNN's backward-data kernel handles poorly: for LeNet-5-Caffe's
conv1 on a batch of 128 it takes about 5x the forward convolution, ~40% of an attack
step. Written as one matmul (dy times the kernel: every output position's columns)
followed by col2im (summing the kh*kw shifted column planes), it is about 2x faster.

The layer is otherwise a `keras.layers.Conv2D` (same weights, config and forward op),
and the fast path is used only where it applies: TensorFlow, channels_last, stride 1,
no dilation, one group, at most `MAX_FAST_CHANNELS` input channels. `export.compact`
turns it back into a plain Conv2D.
"""

import keras
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


def is_plain_stride1_conv(layer):
    """True for a Conv2D whose op is tf.nn.conv2d at stride 1 (TensorFlow, channels_last,
    no dilation, one group): the case the package's faster convolution paths rewrite."""
    return (
        keras.backend.backend() == "tensorflow"
        and layer.data_format == "channels_last"
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
    )


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class InputConv2D(keras.layers.Conv2D):
    """A `keras.layers.Conv2D` with a faster gradient with respect to a few-channel input."""

    def _fast_path(self, inputs):
        return (
            is_plain_stride1_conv(self)
            and inputs.shape[-1] is not None and inputs.shape[-1] <= MAX_FAST_CHANNELS
            and inputs.shape[1] is not None and inputs.shape[2] is not None
        )

    def convolution_op(self, inputs, kernel):
        if not self._fast_path(inputs):
            return super().convolution_op(inputs, kernel)
        kernel = tf.convert_to_tensor(kernel)
        return conv2d_fast_input_gradient(tf.cast(inputs, kernel.dtype), kernel, self.padding)
