"""The deterministic network with its masks folded into weights: what an attack differentiates.

At inference a mask layer multiplies unit c by m_c = E_q[pi_c] >= 0. In a PGD step
that is one more elementwise pass over the activation forward and one backward, and
in bfloat16 on a CPU such passes are slow: on LeNet-5 they were ~20% of an attack
step (benchmarks/README.md). Folded into the weights next to it, m costs nothing per
example. Three local rules, each exact:

- producer: `Conv2D`/`Dense` with a ReLU or linear activation -> mask: relu(z) m =
  relu(z m), so the producer's kernel columns and bias are multiplied by m;
- through BatchNormalization: `BatchNormalization -> ReLU -> mask`: gamma and beta
  are multiplied by m (VGG-16);
- consumer: mask -> `Dense`/`Conv2D`, the mask's output not a model output: the
  consumer's input weights are multiplied by m (the 800 flattened LeNet features).

A mask no rule fits keeps multiplying. The network runs with the folded values
through `stateless_call`; the variables are not touched. The values are recomputed in
every call, i.e. inside the attack's loop: a few small multiplies, and measured faster
in bfloat16 than feeding the loop folded tensors computed once outside it.
"""

import keras

from anp_vs_tf.layers.beta_bernoulli import beta_bernoulli_layers
from anp_vs_tf.layers.sampling import sampling
from anp_vs_tf.models.backbone import split_outputs

L = keras.layers
_LINEAR = (L.Conv2D, L.Dense)  # InputConv2D is a Conv2D


def _homogeneous(layer):
    """f(m x) = m f(x) for m >= 0."""
    if isinstance(layer, L.ReLU):
        return layer.max_value is None and float(layer.threshold) == 0.0
    return getattr(layer, "activation", None) in (keras.activations.relu, keras.activations.linear)


def _only_node(layer):
    nodes = layer._inbound_nodes
    return nodes[0] if len(nodes) == 1 else None


def _producer_layer(node):
    history = getattr(node.input_tensors[0], "_keras_history", None)
    return history.operation if history is not None else None


def _consumers(layer):
    return [node.operation for node in layer._outbound_nodes]


def fold_plan(backbone):
    """[(mask layer, [(variable, how)])]: for each foldable mask, the variables m multiplies.

    how is "out" (the last axis: a producer's output units) or "in" (the second to
    last: a consumer's input units).
    """
    outputs = {id(t) for t in keras.tree.flatten(backbone.outputs)}
    plan = []
    for mask in beta_bernoulli_layers(backbone):
        node = _only_node(mask)
        if node is None:
            continue
        producer = _producer_layer(node)
        alone = producer is not None and len(producer._inbound_nodes) == 1 and _consumers(producer) == [mask]
        consumers = _consumers(mask)
        if alone and isinstance(producer, _LINEAR) and _homogeneous(producer):
            targets = [(producer.kernel, "out")] + ([(producer.bias, "out")] if producer.use_bias else [])
        elif alone and isinstance(producer, L.ReLU) and _homogeneous(producer) and _is_folding_batch_norm(producer):
            norm = _producer_layer(_only_node(producer))
            targets = [(norm.gamma, "out"), (norm.beta, "out")]
        elif (len(consumers) == 1 and isinstance(consumers[0], _LINEAR) and len(consumers[0]._inbound_nodes) == 1
              and not any(id(t) in outputs for t in node.output_tensors)):
            targets = [(consumers[0].kernel, "in")]
        else:
            continue
        plan.append((mask, targets))
    return plan


def _is_folding_batch_norm(relu):
    node = _only_node(relu)
    norm = _producer_layer(node) if node is not None else None
    return (
        isinstance(norm, L.BatchNormalization) and norm.scale and norm.center
        and len(norm._inbound_nodes) == 1 and _consumers(norm) == [relu]
        and norm.axis in (-1, len(norm.input.shape) - 1)
    )


def folded_logits(backbone):
    """x -> the backbone's inference logits, the foldable masks folded into weights.

    Equal to `split_outputs(backbone(x, training=False))[0]` up to float rounding.
    """
    plan = fold_plan(backbone)
    folded = {id(mask) for mask, _ in plan}

    def logits(x):
        scaled = {}
        for mask, targets in plan:
            m = mask.inference_mask()
            for variable, how in targets:
                value = scaled.get(id(variable), None)
                value = keras.ops.convert_to_tensor(variable) if value is None else value
                scaled[id(variable)] = value * (m if how == "out" else m[:, None])
        trainable = [scaled.get(id(v), v) for v in backbone.trainable_variables]
        non_trainable = [scaled.get(id(v), v) for v in backbone.non_trainable_variables]
        with sampling(folded=folded):
            outputs, _ = backbone.stateless_call(trainable, non_trainable, x, training=False)
        return split_outputs(outputs)[0]

    return logits
