"""One walk of a functional Keras graph, and the layer rules that walking code shares.

`metrics.effective_units`, `export.compact` and `models.folding` all read a backbone as a
graph of layer calls. Keras records that graph only in private structures
(`tensor._keras_history`, `layer._inbound_nodes` / `_outbound_nodes`, `node.operation`,
`node.input_tensors`, `model._outputs_struct`); this module is the one place that
touches them, so a Keras upgrade that moves them breaks one file. The rest of the
package sees a `Node`: one call of one layer, its input and output KerasTensors.

It also holds the definitions that code must agree on: which layer is linear, which
output is the logits, and which layers a non-negative per-channel mask scale passes.
"""

import dataclasses

import keras

from anp_vs_tf.layers.bayesian import GaussianConv2D, GaussianDense
from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout

L = keras.layers

LINEAR = (L.Conv2D, L.Dense)
GAUSSIAN = (GaussianConv2D, GaussianDense)
_POOLING = (L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)


# -- the walk --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One call of one layer: `layer(*inputs) -> outputs` (KerasTensors of the model).

    The tensors are Keras' own objects, so `id(tensor)` keys agree between nodes.
    """

    layer: keras.layers.Layer
    inputs: tuple
    outputs: tuple

    @property
    def output(self):
        """The (first) output: every layer the package walks has one."""
        return self.outputs[0]


def _view(keras_node):
    return Node(keras_node.operation, tuple(keras_node.input_tensors), tuple(keras_node.output_tensors))


def _keras_producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        raise ValueError(f"tensor {tensor!r} has no Keras history; a functional model is needed.")
    return history.operation._inbound_nodes[history.node_index]


def producer(tensor):
    """The node that made a KerasTensor of a functional model (ValueError if none did)."""
    return _view(_keras_producer(tensor))


def _keras_nodes_in_order(outputs):
    order, seen = [], set()
    stack = [(_keras_producer(t), False) for t in reversed(outputs)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((_keras_producer(t), False) for t in reversed(node.input_tensors))
    return order


def nodes_in_order(outputs):
    """The nodes `outputs` depend on, each once, inputs first.

    A post-order depth-first walk back from the outputs (the graph is a DAG), so every
    node comes after the nodes making its inputs: evaluating them in this order works.
    Only what the outputs need is visited, e.g. `[logits_output(model)]` skips layers
    that feed only latent features.
    """
    return [_view(node) for node in _keras_nodes_in_order(outputs)]


def called_once(layer):
    """Whether `layer` has exactly one call: a shared layer has one weight set for
    several tensors, so nothing may be folded into its weights."""
    return len(layer._inbound_nodes) == 1


def calls(layer):
    """Every call of `layer`, in order: one Node each (a mask on a channel group has one
    per tensor of the group it is applied to)."""
    return [_view(node) for node in layer._inbound_nodes]


def only_node(layer):
    """The node of a layer called once (ValueError for a shared or never-called layer)."""
    if not called_once(layer):
        raise ValueError(f"{layer.name} is called {len(layer._inbound_nodes)} times, not once.")
    return _view(layer._inbound_nodes[0])


def consumers(node):
    """The nodes reading `node`'s outputs, one entry per input they read one as
    (`Add([x, x])` is listed twice).

    Keras records every call, so calls outside the model the node was walked from
    (another model built on the same tensors) count too.
    """
    mine = {id(t) for t in node.outputs}
    found, seen = [], set()
    for keras_node in node.layer._outbound_nodes:
        if id(keras_node) in seen:
            continue
        seen.add(id(keras_node))
        uses = sum(id(t) in mine for t in keras_node.input_tensors)
        found.extend([_view(keras_node)] * uses)
    return found


def sole_consumer(node, keep=()):
    """The layer that alone consumes `node`'s output, or None.

    None unless both `node.layer` and that consumer are called once, the output is read
    exactly once and it is none of the tensors in `keep` (outputs whose values must
    stay, e.g. the logits). Then the consumer may absorb the node into its own weights.
    """
    if not called_once(node.layer) or any(t is out for t in keep for out in node.outputs):
        return None
    users = consumers(node)
    if len(users) != 1 or not called_once(users[0].layer):
        return None
    return users[0].layer


# -- the outputs -----------------------------------------------------------------------


def _output_struct(model):
    return getattr(model, "_outputs_struct", None)


def logits_output(model):
    """The logits KerasTensor: the "logits" entry of a dict output, else the first output.

    This is `models.backbone.split_outputs`' contract, on the graph instead of values.
    """
    struct = _output_struct(model)
    if isinstance(struct, dict):
        if "logits" not in struct:
            raise ValueError(f"{model.name}'s dict output has no 'logits' entry; got keys {sorted(struct)}.")
        return struct["logits"]
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(f"{model.name} has no symbolic outputs; a functional model is needed.")
    return outputs[0]


def needed_outputs(model):
    """The outputs that count: [logits] when the output is a dict with a "logits" entry
    (the "latents" are for analysis only), otherwise every output."""
    struct = _output_struct(model)
    if isinstance(struct, dict) and "logits" in struct:
        return [struct["logits"]]
    return list(getattr(model, "outputs", None) or [])


# -- layer rules -----------------------------------------------------------------------


def is_linear(layer):
    """Exactly a keras Conv2D or Dense, whose output code may recompute from its kernel
    and bias (type equality: a subclass may compute something else in its call())."""
    return type(layer) in LINEAR


def is_linear_like(layer):
    """A Conv2D/Dense, subclasses included, or a Gaussian one drawing its weights: an
    affine map costing what its kernel's shape says. For counting, not recomputing."""
    return isinstance(layer, LINEAR + GAUSSIAN)


def is_homogeneous_relu(layer):
    """A ReLU layer computing exactly max(x, 0) (no max_value, threshold 0, slope 0).

    So f(m x) = m f(x) for m >= 0, a mask after it can move before it, and kernels that
    compute a ReLU themselves (conv, ReLU and pool in one) may replace it.
    """
    return (isinstance(layer, L.ReLU) and layer.max_value is None and float(layer.threshold) == 0.0
            and float(layer.negative_slope) == 0.0)


def commutes_with_scale(layer):
    """f(m x) = m f(x) for every non-negative per-channel m, so a mask's scale may pass
    `layer` on its way to the next linear layer's input weights.

    True for a ReLU without max_value or threshold (a leaky one too: it is positively
    homogeneous), a relu or linear Activation, max / average / global pooling, Flatten
    (the scale repeats at every position of its channel), zero padding, Dropout and
    another mask.
    """
    if isinstance(layer, _POOLING + (L.Flatten, L.Dropout, L.ZeroPadding2D, BetaBernoulliDropout)):
        return True
    if isinstance(layer, L.ReLU):
        return layer.max_value is None and float(layer.threshold) == 0.0
    if isinstance(layer, L.Activation):
        return layer.activation in (keras.activations.relu, keras.activations.linear)
    return False
