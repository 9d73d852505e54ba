"""`make_prunable(model)`: any functional Keras classifier as a backbone with Beta-Bernoulli masks.

A channel of a convolution (or a neuron of a dense layer) can be removed only together
with every channel it is tied to: the batch norm, activations, pooling and depthwise
convolutions that act on it one to one, and, across a residual `Add`, the same channel
of every branch of the sum. Such a set is a *channel group* (a dependency group, as
Torch-Pruning's DepGraph calls it for PyTorch). `channel_groups` finds them on the Keras
graph by union-find: a Conv2D/Dense starts a group at its output, layers that act per
channel keep their input's group, and an Add merges the groups of its inputs and output.

`make_prunable` rebuilds the model with one `BetaBernoulliDropout` per prunable group,
called on each tensor of the group that a layer mixing or regrouping channels reads (a
Conv2D/Dense, a Flatten, a Concatenate, even one writing the same group): one mask for the whole group, applied wherever the group is read, so a
pruned channel is zero for every reader and needed by none, and `metrics.complexity`
and `export.compact` remove it from every layer that writes or reads it. A mask sits
after the activation it follows (before a pooling or Dropout that comes next), as in
the zoo's networks. The masked tensors are the latent features whose vulnerability the
VS methods suppress.

A group is prunable when a Conv2D/Dense writes it and the model's output does not read
it (the logits keep every class). `groups="inner"` leaves the groups a residual Add ties
together unmasked, so only the channels inside the blocks are pruned.
"""

import keras

from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout
from anp_vs_tf.models import graph

L = keras.layers

GROUPINGS = ("all", "inner")
# Layers acting on each channel alone: the output channel c is the input channel c.
_PER_CHANNEL = (
    L.BatchNormalization, L.ReLU, L.Activation, L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D, L.Dropout, L.ZeroPadding2D, L.DepthwiseConv2D, L.Normalization, L.Rescaling,
)
# Layers whose output channels are new: a group starts at their output.
_PRODUCERS = (L.Conv2D, L.Dense) + graph.GAUSSIAN
# Layers whose output is a new group no layer writes: a flattened or joined map.
_REGROUPING = (L.Flatten, L.Concatenate)
# Between an activation and the layer that reads it, a mask may sit before these.
_MASK_MOVES_BEFORE = (L.MaxPooling2D, L.AveragePooling2D, L.Dropout)


def _supported(node, output_ids):
    layer = node.layer
    known = (L.InputLayer, L.Add) + _PER_CHANNEL + _PRODUCERS + _REGROUPING
    if isinstance(layer, BetaBernoulliDropout):
        raise ValueError(f"{layer.name}: the model already has Beta-Bernoulli masks; make_prunable "
                         "takes a model without them.")
    if isinstance(layer, keras.Model):
        raise ValueError(f"{layer.name} ({type(layer).__name__}) is a nested model; make_prunable needs a "
                         "flat functional model.")
    if not isinstance(layer, known) or len(node.outputs) != 1:
        names = ", ".join(sorted(cls.__name__ for cls in known))
        raise ValueError(f"{layer.name} ({type(layer).__name__}) is not supported by make_prunable; "
                         f"supported layers: {names}.")
    if not graph.called_once(layer):
        raise ValueError(f"{layer.name} is called more than once (a shared layer); make_prunable "
                         "needs each layer called once.")
    if isinstance(layer, L.DepthwiseConv2D) and layer.depth_multiplier != 1:
        raise ValueError(f"{layer.name}: DepthwiseConv2D with depth_multiplier={layer.depth_multiplier} is not "
                         "supported (only 1).")
    if isinstance(layer, L.Concatenate) and layer.axis not in (-1, len(node.output.shape) - 1):
        raise ValueError(f"{layer.name}: Concatenate must join the channel axis (-1), got axis={layer.axis}.")
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"{layer.name}: only channels_last data is supported.")
    if id(node.output) in output_ids and getattr(layer, "activation", None) is keras.activations.softmax:
        raise ValueError(f"{layer.name} outputs probabilities (softmax); make_prunable needs logits: build the "
                         "model with classifier_activation=None (keras.applications) or a linear last layer.")


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, *keys):
        roots = [self.find(k) for k in keys]
        for root in roots[1:]:
            self.parent[root] = roots[0]


class ChannelGroup:
    """Channels tied together: `tensors` (KerasTensors) share their channel axis,
    `producers` are the Conv2D/Dense layers writing them, `residual` says an Add ties
    several writers together, `exits` are the tensors of the group read by a layer that
    mixes or regroups channels (Conv2D, Dense, Flatten, Concatenate), the group's readers."""

    def __init__(self):
        self.tensors, self.producers, self.exits = [], [], []
        self.residual = False
        self.model_output = False

    @property
    def channels(self):
        return int(self.tensors[0].shape[-1])

    @property
    def name(self):
        return self.producers[0].name if self.producers else self.tensors[0].name


def channel_groups(model):
    """The channel groups of a flat functional model, in graph order (ValueError for a
    layer or graph make_prunable does not support, naming it)."""
    logits = graph.logits_output(model)
    outputs = list(model.outputs)
    output_ids = {id(t) for t in outputs}
    nodes = graph.nodes_in_order(outputs)
    for node in nodes:
        _supported(node, output_ids)
    union = _UnionFind()
    for node in nodes:
        layer, out = node.layer, id(node.output)
        union.find(out)
        if isinstance(layer, _PER_CHANNEL):
            union.union(id(node.inputs[0]), out)
        elif isinstance(layer, L.Add):
            union.union(out, *(id(t) for t in node.inputs))
    groups, order = {}, []
    for node in nodes:
        root = union.find(id(node.output))
        if root not in groups:
            groups[root] = ChannelGroup()
            order.append(groups[root])
        group = groups[root]
        group.tensors.append(node.output)
        if isinstance(node.layer, _PRODUCERS):
            group.producers.append(node.layer)
        group.residual |= isinstance(node.layer, L.Add)
        group.model_output |= id(node.output) in output_ids or node.output is logits
    needed = {id(node.layer) for node in nodes}
    for group in order:
        for tensor in group.tensors:
            readers = [c for c in graph.consumers(graph.producer(tensor)) if id(c.layer) in needed]
            if any(not isinstance(c.layer, _PER_CHANNEL + (L.Add,)) for c in readers):
                group.exits.append(tensor)  # read by a layer that mixes channels (or regroups them)
    return order


def _mask_point(tensor):
    """Where the mask for an exit goes: before the pooling or Dropout between it and the
    activation it follows, when nothing else reads what is in between."""
    while True:
        node = graph.producer(tensor)
        if not isinstance(node.layer, _MASK_MOVES_BEFORE) or len(graph.consumers(graph.producer(node.inputs[0]))) != 1:
            return tensor
        tensor = node.inputs[0]


def prunable_groups(model, groups="all"):
    """The channel groups `make_prunable(model, groups)` masks."""
    if groups not in GROUPINGS:
        raise ValueError(f"groups must be one of {GROUPINGS}, got {groups!r}.")
    return [g for g in channel_groups(model)
            if g.producers and g.exits and not g.model_output and not (groups == "inner" and g.residual)]


def _mask_points(model, groups):
    """[(group, tensor the group's mask is called on)], in graph order, each tensor once."""
    points, seen = [], set()
    for group in prunable_groups(model, groups):
        for tensor in group.exits:
            point = _mask_point(tensor)
            if id(point) not in seen:
                seen.add(id(point))
                points.append((group, point))
    return points


def with_latents(model, groups="all"):
    """`model` (the same layers) with the output `{"logits", "latents"}`, the latents being
    the tensors `make_prunable(model, groups)` would mask: an unmasked backbone whose
    vulnerability is measured where the pruned one's is."""
    _single_image_classifier(model)
    points = {id(point) for _, point in _mask_points(model, groups)}
    latents = [node.output for node in graph.nodes_in_order(list(model.outputs)) if id(node.output) in points]
    return keras.Model(model.inputs[0], {"logits": model.outputs[0], "latents": latents}, name=model.name)


def _single_image_classifier(model):
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
        raise ValueError(f"make_prunable needs a functional Keras model, got {type(model).__name__}.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{model.name} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "make_prunable needs one image input and one logits output.")


def make_prunable(model, groups="all", mask_kwargs=None):
    """A copy of `model` with a Beta-Bernoulli mask on every prunable channel group.

    The copy has the same layers (same names, configs and weights) plus the masks, one
    per group, named `<first writer of the group>_bbd`, and outputs
    `{"logits": the model's output, "latents": the masked tensors}`. `mask_kwargs` go to
    every `BetaBernoulliDropout`.
    """
    _single_image_classifier(model)
    masks, layers = {}, {}  # id(tensor the mask is called on) -> its group's mask layer
    for group, point in _mask_points(model, groups):
        if id(group) not in layers:
            layers[id(group)] = BetaBernoulliDropout(name=f"{group.name}_bbd", **dict(mask_kwargs or {}))
        masks[id(point)] = layers[id(group)]
    built, latents, copies = {}, [], []
    for node in graph.nodes_in_order(list(model.outputs)):
        layer = node.layer
        if isinstance(layer, L.InputLayer):
            out = keras.Input(shape=tuple(node.output.shape[1:]), dtype=node.output.dtype, name=layer.name)
        else:
            copy = type(layer).from_config(layer.get_config())
            inputs = [built[id(t)] for t in node.inputs]
            out = copy(inputs[0] if len(inputs) == 1 else inputs)
            copies.append((layer, copy))
        if id(node.output) in masks:
            out = masks[id(node.output)](out)
            latents.append(out)
        built[id(node.output)] = out
    for layer, copy in copies:
        copy.set_weights(layer.get_weights())
    return keras.Model(built[id(model.inputs[0])], {"logits": built[id(model.outputs[0])], "latents": latents},
                       name=model.name)
