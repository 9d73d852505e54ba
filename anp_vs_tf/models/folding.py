"""The deterministic network with masks and batch norm folded into weights: what an attack differentiates.

At inference a mask layer multiplies unit c by m_c = E_q[pi_c] >= 0, and batch norm is
a per-channel affine map y = s x + t. In a PGD step each is one more elementwise pass
forward and one backward over a whole activation, and such passes are slow on a CPU,
in bfloat16 especially (benchmarks/README.md). Folded into the weights next to them
they cost nothing per example, and oneDNN fuses the remaining bias and ReLU into the
convolution. `folded_logits` evaluates the backbone's graph node by node with these
rules, each exact:

- a chain `Conv2D/Dense -> [BatchNormalization] -> [ReLU] -> [mask]`, each the only
  consumer of the one before, becomes one convolution with kernel K s m and bias
  (b s + t) m, then the ReLU (relu(z) m = relu(z m) for m >= 0);
- where the kernel choice (`anp_vs_tf.kernels.choose`) has them, a chain's convolution
  runs a faster rewrite of the same op (`kernels.few_channel_conv` for the image's
  convolution, `kernels.same_conv` for 'same' ones), and a chain of a few-channel
  convolution and a ReLU also takes the 2x2 max-pool that follows it
  (`conv_relu_max_pool`: LeNet-5's conv1 and pool1);
- a mask whose only consumer is a Conv2D/Dense scales that layer's input weights
  (the 800 flattened LeNet features);
- every other layer runs as it is (pooling, Flatten, Normalization, ...), and a mask
  no rule fits multiplies.

Only the logits are computed, so latent features in the middle of a chain need no
tensor of their own. A mask called on several tensors (a channel group of
`models.make_prunable`) multiplies at each. A graph it cannot walk (nested models,
other shared layers) is run as the backbone itself. The values are recomputed in every
call, i.e. inside the attack's loop: a few small multiplies, measured faster in
bfloat16 than feeding the loop tensors folded once outside it.
"""

import keras
import tensorflow as tf

from anp_vs_tf import kernels
from anp_vs_tf.kernels import few_channel_conv, same_conv
from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.models.backbone import split_outputs
from anp_vs_tf.models.graph import (
    called_once,
    is_homogeneous_relu,
    is_linear,
    logits_output,
    nodes_in_order,
    only_node,
    sole_consumer,
)

L = keras.layers


def _activation(layer):
    return getattr(layer, "activation", None)


def _pools_after(linear, pool, input_shape):
    """True if `pool` is a 2x2/2 max-pool that conv_relu_max_pool can take into `linear`'s chain."""
    return (isinstance(linear, L.Conv2D) and few_channel_conv.applies_to_input(linear, input_shape)
            and type(pool) is L.MaxPooling2D and tuple(pool.pool_size) == (2, 2)
            and tuple(pool.strides) == (2, 2) and pool.padding == "valid" and pool.data_format == "channels_last")


class _Chain:
    """Conv2D/Dense -> [BN] -> [ReLU] -> [mask] -> [2x2 max-pool], evaluated as one layer
    with folded weights."""

    def __init__(self, linear, input_shape, choice):
        self.linear, self.norm, self.relu, self.mask, self.pool = linear, None, None, None, None
        self.input_shape, self.choice = input_shape, choice

    def layers(self):
        return [layer for layer in (self.linear, self.norm, self.relu, self.mask, self.pool) if layer is not None]

    def __call__(self, x, input_scale=None):
        linear = self.linear
        kernel = tf.convert_to_tensor(linear.kernel)
        bias = tf.convert_to_tensor(linear.bias) if linear.use_bias else None
        if input_scale is not None:  # a mask before this layer, folded into its input rows
            kernel = kernel * input_scale[:, None]
        if self.norm is not None:  # y = s z + t with the moving statistics
            norm = self.norm
            s = tf.math.rsqrt(tf.convert_to_tensor(norm.moving_variance) + norm.epsilon)
            if norm.scale:
                s = s * tf.convert_to_tensor(norm.gamma)
            t = -tf.convert_to_tensor(norm.moving_mean) * s
            if norm.center:
                t = t + tf.convert_to_tensor(norm.beta)
            kernel, bias = kernel * s, (t if bias is None else bias * s + t)
        if self.mask is not None:
            m = self.mask.inference_mask()
            kernel, bias = kernel * m, (None if bias is None else bias * m)
        dtype = linear.compute_dtype
        x = tf.cast(x, dtype)
        if self.pool is not None:
            return few_channel_conv.conv_relu_max_pool(
                x, tf.cast(kernel, dtype), None if bias is None else tf.cast(bias, dtype), linear.padding)
        if isinstance(linear, L.Conv2D):
            y = self._convolution(x, tf.cast(kernel, dtype))
        elif x.shape.rank == 2:
            y = tf.matmul(x, tf.cast(kernel, dtype))
        else:
            y = tf.tensordot(x, tf.cast(kernel, dtype), axes=[[x.shape.rank - 1], [0]])
        if bias is not None:
            y = tf.nn.bias_add(y, tf.cast(bias, dtype))
        activation = self.relu.call if self.relu is not None else _activation(linear)
        return activation(y)

    def _convolution(self, x, kernel):
        """The chain's convolution, by the rewrite the kernel choice has for it, if any."""
        linear, choice = self.linear, self.choice
        if choice.few_channel_conv and few_channel_conv.applies_to_input(linear, self.input_shape):
            return few_channel_conv.conv2d_fast_input_gradient(x, kernel, linear.padding)
        if choice.same_conv and same_conv.applies_to(linear, self.input_shape):
            return same_conv.same_convolution(x, kernel, linear.kernel_size)
        return linear.convolution_op(x, kernel)


def _plan(backbone, choice=kernels.PLAIN):
    """(logits tensor, nodes in order, {id(first layer of a chain): chain},
    [(mask, the layer whose input rows it scales)]), or None for a graph this cannot walk.
    `choice` is the `kernels.KernelChoice` the chains compute with."""
    try:
        logits = logits_output(backbone)
        nodes = nodes_in_order([logits])
    except ValueError:
        return None
    if any(isinstance(node.layer, keras.Model)
           or not (called_once(node.layer) or isinstance(node.layer, BetaBernoulliDropout)) for node in nodes):
        return None  # a mask shared by a channel group runs as a layer (no chain takes it)
    chains, into_consumer = {}, []
    claimed = set()
    for node in nodes:
        layer = node.layer
        if id(layer) in claimed or not is_linear(layer):
            continue
        chain = _Chain(layer, node.inputs[0].shape, choice)
        nxt = sole_consumer(node, keep=[logits])
        if (isinstance(nxt, L.BatchNormalization) and _activation(layer) is keras.activations.linear
                and nxt.axis in (-1, len(node.output.shape) - 1)):
            chain.norm = nxt
            nxt = sole_consumer(only_node(nxt), keep=[logits])
        if is_homogeneous_relu(nxt) and _activation(layer) is keras.activations.linear:
            chain.relu = nxt
            nxt = sole_consumer(only_node(nxt), keep=[logits])
        if isinstance(nxt, BetaBernoulliDropout) and (
                chain.relu is not None or _activation(layer) in (keras.activations.relu, keras.activations.linear)):
            chain.mask = nxt
            nxt = sole_consumer(only_node(nxt), keep=[logits])
        rectified = chain.relu is not None or _activation(layer) is keras.activations.relu
        if choice.conv_relu_pool and rectified and _pools_after(layer, nxt, node.inputs[0].shape):
            chain.pool = nxt
        chains[id(layer)] = chain
        claimed.update(id(part) for part in chain.layers())
    for node in nodes:
        layer = node.layer
        if isinstance(layer, BetaBernoulliDropout) and id(layer) not in claimed:
            consumer = sole_consumer(node, keep=[logits])
            if is_linear(consumer):
                into_consumer.append((layer, consumer))
    return logits, nodes, chains, into_consumer


def folded_logits(backbone, kernels_setting=None):
    """x -> the backbone's inference logits, with masks and batch norm folded into weights.

    Equal to `split_outputs(backbone(x, training=False))[0]` up to float rounding.
    kernels_setting: "auto", "keras" or a `kernels.KernelChoice`; None takes the
    enclosing `kernels.use()`. It is resolved now, for the device being traced for.
    """
    plan = _plan(backbone, kernels.choose(kernels_setting, backbone.compute_dtype))
    if plan is None:
        return lambda x: split_outputs(backbone(x, training=False))[0]
    logits, nodes, chains, into_consumer = plan
    members = {id(part): chain for chain in chains.values() for part in chain.layers()}
    input_mask = {id(consumer): mask for mask, consumer in into_consumer}
    passed_on = {id(mask) for mask, _ in into_consumer}

    def run(x):
        values = {}  # id(KerasTensor) -> tensor
        for node in nodes:
            layer = node.layer
            out = node.output
            if isinstance(layer, L.InputLayer):
                values[id(out)] = x
                continue
            chain = members.get(id(layer))
            if chain is not None and layer is not chain.linear:
                continue  # the chain's other layers are in its weights
            inputs = [values[id(t)] for t in node.inputs]
            if chain is not None:
                mask = input_mask.get(id(layer))
                end = chain.layers()[-1]  # the chain's result is its last layer's output
                values[id(only_node(end).output)] = chain(
                    inputs[0], None if mask is None else mask.inference_mask())
                continue
            if id(layer) in passed_on:
                values[id(out)] = inputs[0]  # the consumer scales its input rows instead
                continue
            values[id(out)] = layer(inputs[0] if len(inputs) == 1 else inputs, training=False)
        return values[id(logits)]

    return run
