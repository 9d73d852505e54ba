"""models.graph: the one walk of the Keras graph, checked by hand on small models."""

import keras
import pytest

from anp_vs_tf.layers import BetaBernoulliDropout, GaussianConv2D
from anp_vs_tf.models import graph

L = keras.layers


def branched():
    """image -> conv_a -> {relu_b, conv_c} -> add -> flat -> logits; latents = [relu_b]."""
    image = keras.Input((6, 6, 2), name="image")
    a = L.Conv2D(3, 3, name="conv_a")(image)
    b = L.ReLU(name="relu_b")(a)
    c = L.Conv2D(3, 1, name="conv_c")(a)
    s = L.Add(name="add")([b, c])
    logits = L.Dense(4, name="logits")(L.Flatten(name="flat")(s))
    return keras.Model(image, {"logits": logits, "latents": [b]}, name="branched")


def names(nodes):
    return [node.layer.name for node in nodes]


def test_nodes_come_inputs_first_each_once():
    model = branched()
    nodes = graph.nodes_in_order([graph.logits_output(model)])
    # Depth first from the logits, the Add's inputs in their order: relu_b's branch first.
    assert names(nodes) == ["image", "conv_a", "relu_b", "conv_c", "add", "flat", "logits"]
    add = nodes[4]
    assert [graph.producer(t).layer.name for t in add.inputs] == ["relu_b", "conv_c"]
    assert add.output is graph.producer(add.output).output
    # Starting from every output changes nothing: the latent is on the way to the logits.
    assert names(graph.nodes_in_order(model.outputs)) == names(nodes)


def test_a_tensor_without_history_is_refused():
    with pytest.raises(ValueError, match="has no Keras history"):
        graph.producer(keras.KerasTensor((None, 3)))


def test_logits_of_a_dict_a_single_and_a_list_output():
    model = branched()
    logits = graph.logits_output(model)
    assert graph.producer(logits).layer.name == "logits"
    assert graph.needed_outputs(model) == [logits]

    x = keras.Input((3,))
    y, z = L.Dense(2, name="first")(x), L.Dense(2, name="second")(x)
    assert graph.logits_output(keras.Model(x, y)) is y
    two = keras.Model(x, [y, z])
    assert graph.logits_output(two) is y
    assert len(graph.needed_outputs(two)) == 2

    with pytest.raises(ValueError, match="no 'logits' entry"):
        graph.logits_output(keras.Model(x, {"scores": y}))


def test_sole_consumer_on_a_chain_a_branch_and_a_shared_layer():
    model = branched()
    by_name = {node.layer.name: node for node in graph.nodes_in_order([graph.logits_output(model)])}
    assert graph.sole_consumer(by_name["conv_c"]).name == "add"
    assert graph.sole_consumer(by_name["flat"]).name == "logits"
    assert graph.sole_consumer(by_name["conv_a"]) is None  # read by relu_b and conv_c
    assert [n.layer.name for n in graph.consumers(by_name["conv_a"])] == ["relu_b", "conv_c"]
    assert graph.sole_consumer(by_name["relu_b"]).name == "add"
    # ... unless its value must stay, as a latent output does.
    assert graph.sole_consumer(by_name["relu_b"], keep=model.output["latents"]) is None
    assert graph.consumers(by_name["logits"]) == []

    x = keras.Input((3,))
    shared = L.Dense(3, name="shared")
    h = L.Dense(3, name="h")(x)
    twice = L.Add()([h, h])
    y = shared(shared(twice))
    keras.Model(x, y)
    h_node = graph.producer(h)
    assert len(graph.consumers(h_node)) == 2 and graph.sole_consumer(h_node) is None  # read twice
    assert graph.sole_consumer(graph.producer(twice)) is None  # its consumer is shared
    assert not graph.called_once(shared) and graph.called_once(h_node.layer)
    assert graph.only_node(h_node.layer).output is h
    with pytest.raises(ValueError, match="shared is called 2 times"):
        graph.only_node(shared)


def test_layer_rules():
    class MyConv(L.Conv2D):
        pass

    assert graph.is_linear(L.Conv2D(2, 3)) and graph.is_linear(L.Dense(2))
    assert not graph.is_linear(MyConv(2, 3)) and not graph.is_linear(GaussianConv2D(2, 3))
    assert graph.is_linear_like(MyConv(2, 3)) and graph.is_linear_like(GaussianConv2D(2, 3))
    assert not graph.is_linear_like(L.BatchNormalization())

    assert graph.is_homogeneous_relu(L.ReLU())
    for relu in (L.ReLU(max_value=6.0), L.ReLU(threshold=0.5), L.ReLU(negative_slope=0.1)):
        assert not graph.is_homogeneous_relu(relu)
    assert not graph.is_homogeneous_relu(L.Activation("relu"))

    for layer in (L.ReLU(), L.ReLU(negative_slope=0.1), L.Activation("relu"), L.Activation("linear"),
                  L.MaxPooling2D(2), L.AveragePooling2D(2), L.GlobalAveragePooling2D(), L.Flatten(),
                  L.Dropout(0.5), BetaBernoulliDropout()):
        assert graph.commutes_with_scale(layer), layer
    for layer in (L.ReLU(max_value=6.0), L.ReLU(threshold=0.5), L.Activation("tanh"),
                  L.BatchNormalization(), L.Dense(2), L.Rescaling(2.0)):
        assert not graph.commutes_with_scale(layer), layer
