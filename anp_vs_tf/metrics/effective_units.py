"""Which units of a pruned network are deployed: alive (can be non-zero) AND needed (reach the logits).

`pruning_graph(model)` walks the functional Keras graph (`models.graph`: from the model's
outputs back through each tensor's history, so branches and `Add` work), checks that
every layer is supported and reads each BetaBernoulliDropout's active mask.
`effective_units(graph, masks)` then decides for every unit of the last axis (a neuron,
or a channel of a channel-last map) of every tensor whether it is

    alive:  can be non-zero. Conv2D / Dense / BatchNormalization / Normalization
            outputs are alive everywhere (bias, BN(0) != 0); a BetaBernoulliDropout
            keeps `input alive AND active_mask`; Add is the OR of its inputs,
            Concatenate joins them; a DepthwiseConv2D with a bias is alive everywhere;
            the other layers keep their input's aliveness (an Activation, or a
            Rescaling with an offset, that maps 0 to non-zero makes everything alive).
    needed: reaches the logits. Conv2D / Dense need all their inputs iff any output
            is needed; a BetaBernoulliDropout needs `output needed AND active_mask`;
            Add hands its output's needs to every input, Concatenate each input its
            slice; the other layers (DepthwiseConv2D too) pass needs back unchanged
            (Flatten: a channel is needed if any of its positions is; SelectFeatures:
            only the selected features, as needed as their outputs).

A unit is *effective* (deployed) iff alive AND needed. "Needed" starts from the `logits`
entry when the model outputs a dict that has one (the `latents` are analysis outputs),
otherwise from all outputs. `metrics.complexity` counts the costs of effective units
only and `export.compact` keeps only them.

A mask layer may be called on several tensors: one mask for a group of channels that a
residual `Add` ties together (`models.make_prunable`), applied wherever the group is read.
"""

import dataclasses

import keras
import numpy as np

from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.layers.select_features import SelectFeatures
from anp_vs_tf.models.graph import (
    GAUSSIAN,
    LINEAR,
    is_linear_like,
    needed_outputs,
    nodes_in_order,
)

L = keras.layers

# Layers acting per unit of the last axis: "needed" passes back as is, and aliveness
# passes forward when the layer maps 0 to 0 (see `_keeps_zero`).
_CHANNELWISE = (
    L.ReLU,
    L.Activation,
    L.MaxPooling2D,
    L.AveragePooling2D,
    L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D,
    L.Dropout,
    L.Rescaling,
    L.BatchNormalization,
    L.Normalization,
    L.ZeroPadding2D,
    L.DepthwiseConv2D,
)
SUPPORTED = (L.InputLayer, L.Flatten, L.Add, L.Concatenate, BetaBernoulliDropout, SelectFeatures) + LINEAR \
    + GAUSSIAN + _CHANNELWISE


@dataclasses.dataclass
class PruningGraph:
    """A flat functional model's nodes in order, with what unit propagation needs."""

    nodes: list
    needed_outputs: list
    masks: dict  # id(BetaBernoulliDropout) -> bool array of its active units
    keeps_zero: dict  # id(layer) -> bool


def _check_supported(node, used):
    layer = node.layer
    if isinstance(layer, keras.Model):
        raise ValueError(
            f"{layer.name} ({type(layer).__name__}) is a nested model; complexity() needs a flat "
            "functional model (rebuild it without sub-models)."
        )
    if not isinstance(layer, SUPPORTED):
        names = ", ".join(sorted({cls.__name__ for cls in SUPPORTED}))
        raise ValueError(
            f"{layer.name} ({type(layer).__name__}) is not supported by complexity(); "
            f"supported layers: {names}."
        )
    if id(layer) in used and not isinstance(layer, BetaBernoulliDropout):
        raise ValueError(f"{layer.name} is called more than once (shared layer); not supported.")
    used.add(id(layer))
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"{layer.name}: only channels_last data is supported.")
    if isinstance(layer, L.Conv2D) and layer.groups != 1:
        raise ValueError(f"{layer.name}: grouped convolutions (groups={layer.groups}) are not supported.")
    if isinstance(layer, L.DepthwiseConv2D) and layer.depth_multiplier != 1:
        raise ValueError(f"{layer.name}: DepthwiseConv2D with depth_multiplier={layer.depth_multiplier} "
                         "is not supported (only 1: one output channel per input channel).")
    if isinstance(layer, L.Concatenate) and layer.axis not in (-1, len(node.output.shape) - 1):
        raise ValueError(f"{layer.name}: Concatenate must join the last (channel) axis, got axis={layer.axis}.")
    last_axis = (-1, len(node.output.shape) - 1)
    if isinstance(layer, L.BatchNormalization) and layer.axis not in last_axis:
        raise ValueError(f"{layer.name}: BatchNormalization must normalize the last axis.")
    for tensor in node.inputs + node.outputs:
        if any(d is None for d in tensor.shape[1:]):
            raise ValueError(f"{layer.name}: shapes must be fully known, got {tuple(tensor.shape)}.")


def _keeps_zero(layer):
    """Whether the layer maps a dead (all-zero) unit to zero, so it stays dead."""
    if isinstance(layer, (L.BatchNormalization, L.Normalization)):
        return False
    if isinstance(layer, L.DepthwiseConv2D):
        return not layer.use_bias
    if isinstance(layer, L.Rescaling):
        return bool(np.all(np.asarray(layer.offset) == 0))
    if isinstance(layer, (L.ReLU, L.Activation)):
        return float(keras.ops.convert_to_numpy(layer.call(keras.ops.zeros((1, 1))))[0, 0]) == 0.0
    return True


def pruning_graph(model):
    """The `PruningGraph` of a flat functional model; ValueError for what is not supported.

    Raises for nested models, shared layers, layers outside `SUPPORTED`, channels-first
    data, grouped convolutions and shapes not fully known.
    """
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(f"{model.name} has no symbolic outputs; complexity needs a functional model.")
    needed = needed_outputs(model)
    nodes = nodes_in_order(list(outputs))
    used = set()
    for node in nodes:
        _check_supported(node, used)
    layers = [node.layer for node in nodes]
    masks = {
        id(layer): np.asarray(keras.ops.convert_to_numpy(layer.active_mask()), bool)
        for layer in layers if isinstance(layer, BetaBernoulliDropout)
    }  # one entry per mask layer, however many tensors it is called on
    keeps_zero = {id(layer): _keeps_zero(layer) for layer in layers}
    return PruningGraph(nodes, needed, masks, keeps_zero)


def _units(tensor):
    return int(tensor.shape[-1])


def _forward(node, alive_in, graph, masks):
    """The output's per-unit aliveness from the inputs'."""
    layer, out = node.layer, node.output
    if isinstance(layer, L.InputLayer) or is_linear_like(layer) or not graph.keeps_zero[id(layer)]:
        return np.ones(_units(out), bool)
    if isinstance(layer, BetaBernoulliDropout):
        return alive_in[0] & masks[id(layer)]
    if isinstance(layer, L.Add):
        return np.logical_or.reduce(alive_in)
    if isinstance(layer, L.Concatenate):
        return np.concatenate(alive_in)
    if isinstance(layer, L.Flatten):  # (..., C) -> (positions * C,), channel-last order
        return np.tile(alive_in[0], _units(out) // len(alive_in[0]))
    if isinstance(layer, SelectFeatures):
        return alive_in[0][layer.indices]
    return alive_in[0]


def _backward(node, needed_out, masks):
    """Each input's per-unit "needed" from the output's."""
    layer, inputs = node.layer, node.inputs
    if is_linear_like(layer):
        return [np.full(_units(inputs[0]), needed_out.any())]
    if isinstance(layer, BetaBernoulliDropout):
        return [needed_out & masks[id(layer)]]
    if isinstance(layer, L.Flatten):
        return [needed_out.reshape(-1, _units(inputs[0])).any(axis=0)]
    if isinstance(layer, L.Concatenate):
        return np.split(needed_out, np.cumsum([_units(t) for t in inputs])[:-1])
    if isinstance(layer, SelectFeatures):
        needed_in = np.zeros(_units(inputs[0]), bool)
        np.logical_or.at(needed_in, layer.indices, needed_out)
        return [needed_in]
    return [needed_out] * len(inputs)


def effective_units(graph, masks):
    """id(tensor) -> bool array over its last axis: alive AND needed.

    `masks` maps id(BetaBernoulliDropout) -> its kept units: `graph.masks` for the
    network as pruned, all True for the dense one.
    """
    alive, needed = {}, {}
    for node in graph.nodes:
        alive_in = [alive[id(t)] for t in node.inputs]
        out = node.output
        alive[id(out)] = _forward(node, alive_in, graph, masks)
        needed[id(out)] = np.zeros(_units(out), bool)
    for tensor in graph.needed_outputs:
        needed[id(tensor)][:] = True
    for node in reversed(graph.nodes):
        needed_in = _backward(node, needed[id(node.output)], masks)
        for tensor, need in zip(node.inputs, needed_in):
            needed[id(tensor)] |= need
    return {key: alive[key] & needed[key] for key in alive}
