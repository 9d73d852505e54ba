"""`compact(model)`: the pruned network as it really is, a plain Keras model without masks.

A Beta-Bernoulli model still carries every channel and multiplies each by its mask
value at inference. `compact` rebuilds the graph from standard layers with only the
*effective* units (alive and reaching the logits, as `metrics.effective_units` decides them),
so its params and FLOPs are `complexity(model).params_kept` / `flops_kept`.

The folding rule. At inference a mask layer multiplies unit c by m_c = E_q[pi_c] >= 0
(exactly 0 when pruned). m_c is carried forward as a pending per-unit scale and folded
into the *consumer*, the next Conv2D / Dense, whose input weights for c are multiplied
by m_c. On the way there the scale may only pass layers that commute with a
non-negative per-channel scale (`models.graph.commutes_with_scale`): ReLU (max_value
None, threshold 0), max / average / global pooling, Flatten (the scale repeats at every
position of its channel), zero padding, Dropout and another mask; a DepthwiseConv2D
takes it into its per-channel kernels, a Concatenate joins the scales of its inputs,
and before an Add (a sum of branches, which no scale passes) it becomes a `Rescaling`
by the mask values. Anything else between a mask and its consumer
(BatchNormalization, Normalization, a non-ReLU activation, the model output) raises
ValueError. This is exact for every graph of the zoo: LeNet `Conv(relu) -> mask ->
pool -> Conv` and `pool -> Flatten -> mask -> Dense`, VGG `Conv -> BN -> ReLU -> mask
-> [pool] -> Conv`, dense `Dense -> [BN] -> ReLU -> mask -> Dense`, and the residual
nets of `models.make_prunable`, where one mask serves every reader of a channel group
and the inputs of an Add keep the same channels.

Pruned units are dropped at both ends: the producer keeps kernel[..., kept], bias[kept]
and each BatchNormalization keeps gamma, beta and moving statistics [kept]; the
consumer keeps kernel[..., kept_in, :] (after Flatten: every position of a kept
channel, less the (channel, position) features a mask on the flattened map pruned,
which `SelectFeatures` drops right after the Flatten). Dropout and mask layers
disappear; the compact model outputs the logits only.
"""

import keras
import numpy as np

from anp_vs_tf.layers.beta_bernoulli import BetaBernoulliDropout, beta_bernoulli_layers
from anp_vs_tf.layers.select_features import SelectFeatures
from anp_vs_tf.metrics.effective_units import effective_units, pruning_graph
from anp_vs_tf.models.graph import commutes_with_scale, is_linear, producer

L = keras.layers

# Channelwise layers copied as they are (config only, no weights to slice).
_COPIED = (L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D, L.ReLU,
           L.Activation, L.ZeroPadding2D)


def compact(model):
    """A plain Keras model (logits output) equal to `model`'s inference logits, pruned units removed.

    `model` is a `RobustModel` or a backbone (functional model, optionally with a
    {"logits", "latents"} output). A model without mask layers comes back with the same
    widths. Raises ValueError with one line for a graph the folding rule cannot handle.
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, keras.Model) or not getattr(backbone, "outputs", None):
        raise ValueError(f"compact() needs a functional Keras model or a RobustModel, got {type(model).__name__}.")
    graph = pruning_graph(backbone)  # raises ValueError for nested models, shared or unknown layers
    if len(backbone.inputs) != 1:
        raise ValueError(f"{backbone.name} has {len(backbone.inputs)} inputs; compact() needs one image input.")
    if len(graph.needed_outputs) != 1:
        raise ValueError(
            f"{backbone.name} has {len(graph.needed_outputs)} outputs and no 'logits' entry; "
            "compact() needs a single logits output."
        )
    builder = _Builder(effective_units(graph, graph.masks))
    logits, scale = builder.build(graph.needed_outputs[0])
    if scale is not None:
        raise ValueError(f"{backbone.name}: a mask acts on the output itself; there is no layer to fold it into.")
    image = builder.built[id(backbone.inputs[0])][0]
    return keras.Model(image, logits, name=f"{backbone.name}_compact")


def has_masks(model):
    """Whether `model` (a RobustModel or a backbone) has Beta-Bernoulli mask layers."""
    return bool(beta_bernoulli_layers(getattr(model, "backbone", model)))


class _Builder:
    """Rebuilds the graph tensor by tensor: old tensor -> (new tensor, pending scale or None)."""

    def __init__(self, kept):
        self.kept = kept  # id(old tensor) -> bool array over its last axis
        self.built = {}

    def build(self, tensor):
        key = id(tensor)
        if key not in self.built:
            node = producer(tensor)
            inputs = [self.build(t) for t in node.inputs]
            self.built[key] = self._layer(node, inputs)
        return self.built[key]

    def _layer(self, node, inputs):
        layer = node.layer
        kept_out = self.kept[id(node.output)]
        if not kept_out.any():
            raise ValueError(
                f"every unit of {layer.name} is pruned, so the logits no longer depend on the "
                "input; there is no network to export."
            )
        if isinstance(layer, L.InputLayer):
            if not kept_out.all():
                raise ValueError(f"{layer.name}: some input channels are unused; compact() keeps the full input.")
            out = node.output
            return keras.Input(shape=tuple(out.shape[1:]), dtype=out.dtype, name=layer.name), None
        x, scale = inputs[0]
        kept_in = self.kept[id(node.inputs[0])]
        if is_linear(layer):
            return self._linear(layer, x, scale, kept_in, kept_out), None
        if isinstance(layer, BetaBernoulliDropout):
            mask = keras.ops.convert_to_numpy(layer.inference_mask()).astype(np.float64)
            return x, mask if scale is None else scale * mask
        if isinstance(layer, L.Dropout):
            return x, scale
        if isinstance(layer, L.Flatten):
            positions = len(kept_out) // len(kept_in)
            y = _copy(layer)(x)
            # x holds the kept channels at every position; a mask on the flattened
            # features may have pruned some (channel, position) pairs as well.
            present = np.tile(kept_in, positions)
            if not np.array_equal(kept_out, present):
                y = SelectFeatures(np.flatnonzero(kept_out[present]), name=f"{layer.name}_kept")(y)
            return y, None if scale is None else np.tile(scale, positions)
        if isinstance(layer, L.Add):
            return self._add(node, inputs, kept_out)
        if isinstance(layer, L.Concatenate):
            return self._concatenate(node, inputs, kept_out)
        if isinstance(layer, SelectFeatures):  # compacting a compact model
            wanted = np.asarray(layer.indices)[kept_out]  # input features the kept outputs read
            indices = np.searchsorted(np.flatnonzero(kept_in), wanted)
            scale = None if scale is None else scale[layer.indices]
            if np.array_equal(indices, np.arange(int(kept_in.sum()))):  # the Flatten selected them
                return x, scale
            return SelectFeatures(indices, name=layer.name)(x), scale
        if not np.array_equal(kept_in, kept_out):
            raise ValueError(f"{layer.name} ({type(layer).__name__}) changes which units are kept; not supported.")
        if isinstance(layer, L.DepthwiseConv2D):
            return self._depthwise(layer, x, scale, kept_out), None
        if isinstance(layer, L.BatchNormalization):
            _no_pending(layer, scale)
            new = L.BatchNormalization.from_config(layer.get_config())  # plain Keras layers only
            y = new(x)
            new.set_weights([w[kept_out] for w in layer.get_weights()])
            return y, None
        if type(layer) in (L.Normalization, L.Rescaling):
            _no_pending(layer, scale)
            if not kept_out.all():
                raise ValueError(f"{layer.name}: {type(layer).__name__} on pruned channels is not supported.")
            new = _copy(layer)
            y = new(x)
            new.set_weights(layer.get_weights())
            return y, None
        if type(layer) in _COPIED:
            if scale is not None and not commutes_with_scale(layer):
                _no_pending(layer, scale)
            return _copy(layer)(x), scale
        raise ValueError(
            f"{layer.name} ({type(layer).__name__}) is not supported by compact(); supported: "
            "InputLayer, Normalization, Rescaling, Conv2D, DepthwiseConv2D, Dense, BatchNormalization, "
            "ReLU, Activation, pooling, ZeroPadding2D, Flatten, Add, Concatenate, SelectFeatures, "
            "Dropout, BetaBernoulliDropout."
        )

    def _add(self, node, inputs, kept_out):
        """An Add of the kept channels; a pending scale cannot pass a sum, so it is applied
        before it (a Rescaling by the mask values)."""
        terms = []
        for tensor, (x, scale) in zip(node.inputs, inputs):
            kept_in = self.kept[id(tensor)]  # a subset of kept_out (metrics.effective_units)
            if not np.array_equal(kept_in, kept_out):
                raise ValueError(
                    f"{node.layer.name}: the inputs of the Add keep different channels ({int(kept_in.sum())} of "
                    f"{int(kept_out.sum())}); compact() needs one mask for all the channels an Add ties together "
                    "(models.make_prunable gives that).")
            if scale is not None:
                x = L.Rescaling(scale[kept_in].astype(np.float32), name=f"{node.layer.name}_scale{len(terms)}")(x)
            terms.append(x)
        return _copy(node.layer)(terms), None

    def _concatenate(self, node, inputs, kept_out):
        """The kept channels of each input, joined; pending scales join too (1 where none)."""
        scales = [np.ones(int(t.shape[-1])) if scale is None else scale  # over all channels, as pending scales are
                  for t, (_, scale) in zip(node.inputs, inputs)]
        pending = None if all(scale is None for _, scale in inputs) else np.concatenate(scales)
        return _copy(node.layer)([x for x, _ in inputs]), pending

    @staticmethod
    def _depthwise(layer, x, scale, kept):
        """DepthwiseConv2D on the kept channels, a pending scale folded into their kernels."""
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)  # (kh, kw, channels, 1)
        if scale is not None:
            kernel = kernel * scale[:, None]
        weights = [kernel[:, :, kept, :].astype(np.float32)]
        if layer.use_bias:
            weights.append(keras.ops.convert_to_numpy(layer.bias)[kept])
        new = L.DepthwiseConv2D.from_config(layer.get_config())
        y = new(x)
        new.set_weights(weights)
        return y

    @staticmethod
    def _linear(layer, x, scale, kept_in, kept_out):
        """Conv2D / Dense with the pending scale folded into its input weights, then both sliced."""
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        if scale is not None:
            kernel = kernel * scale[:, None]  # the input axis is the second to last
        kernel = kernel[..., np.flatnonzero(kept_in), :][..., np.flatnonzero(kept_out)]
        weights = [kernel.astype(np.float32)]
        if layer.use_bias:
            weights.append(keras.ops.convert_to_numpy(layer.bias)[kept_out])
        config = layer.get_config()
        config["filters" if isinstance(layer, L.Conv2D) else "units"] = int(kept_out.sum())
        new = (L.Dense if isinstance(layer, L.Dense) else L.Conv2D).from_config(config)  # plain Keras layers only
        y = new(x)
        new.set_weights(weights)
        return y


def _copy(layer):
    return type(layer).from_config(layer.get_config())


def _no_pending(layer, scale):
    if scale is not None:
        raise ValueError(
            f"{layer.name} ({type(layer).__name__}) sits between a mask and the next Conv2D/Dense, "
            "so the mask cannot be folded into weights; compact() supports only ReLU, pooling, "
            "Flatten and Dropout there."
        )
