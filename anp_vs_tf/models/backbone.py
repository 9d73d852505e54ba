"""What the trainer needs from any classifier: logits, latent features, shared weights.

A backbone is a Keras model whose output is `{"logits": ..., "latents": [...]}`. A
model with a single logits output also works; it simply has no latent features, so
methods with the vulnerability term cannot use it.
"""

import numpy as np

from anp_vs_tf.layers.walk import all_layers
from anp_vs_tf.models import graph


def split_outputs(outputs):
    """(logits, latents) from a backbone's output."""
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(
                "a backbone's dict output needs a 'logits' entry (and optionally 'latents'); "
                f"got keys {sorted(outputs)}."
            )
        return outputs["logits"], list(outputs.get("latents", []))
    return outputs, []


def latent_names(backbone):
    """Names of the latent features: the layers whose outputs they are, and for a layer
    that makes several (one mask on a channel group), `name_2`, `name_3`, ... after the first."""
    _, latents = split_outputs(backbone.output)
    names, seen = [], {}
    for z in latents:
        name = graph.producer(z).layer.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def _weighted_layers(model):
    """{name: layer} of the layers that own weights (nested models are walked, not listed)."""
    return {layer.name: layer for layer in all_layers(model)
            if not hasattr(layer, "layers") and layer.weights}


def transfer_weights(source, target):
    """Copy the weights of every layer of `source` into the same-named layer of `target`.

    This is how a pruning run starts from a pretrained base: the base model has no
    Beta-Bernoulli layers, the pruned one has them in addition, and all other layers
    share names. Returns the names of the layers copied; raises ValueError when a
    shared layer has different shapes or when nothing matches.
    """
    source_layers = _weighted_layers(source)
    copied = []
    for name, layer in _weighted_layers(target).items():
        if name not in source_layers:
            continue
        values = source_layers[name].get_weights()
        shapes = [np.shape(v) for v in values]
        expected = [tuple(w.shape) for w in layer.weights]
        if shapes != expected:
            raise ValueError(
                f"layer {name!r} has weights of shapes {expected} here but {shapes} in the "
                "model to initialise from: the two are different architectures."
            )
        layer.set_weights(values)
        copied.append(name)
    if not copied:
        raise ValueError(
            f"no layer of {target.name!r} has a same-named counterpart in {source.name!r}; "
            "initialise from a model of the same architecture."
        )
    return copied
