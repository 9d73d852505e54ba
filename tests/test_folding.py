"""Masks and batch norm folded into weights (models.folding): the same logits and input
gradients, without the per-activation products and normalizations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, kernels, models
from anp_vs_tf.layers import BetaBernoulliDropout, beta_bernoulli_layers
from anp_vs_tf.models.folding import _plan, folded_logits
from anp_vs_tf.trainers import RobustModel, get_method

SHAPES = {"lenet5_caffe": (28, 28, 1), "lenet_300_100": (28, 28, 1), "vgg16": (32, 32, 3)}


def randomize(backbone, seed=0):
    """Masks with a spread of keep probabilities, a third of the units pruned outright,
    and batch norm statistics far from their initial values."""
    rng = np.random.default_rng(seed)
    for layer in beta_bernoulli_layers(backbone):
        layer.a_uc.assign(rng.normal(0.0, 2.0, layer.a_uc.shape))
        layer.b_uc.assign(rng.normal(0.0, 1.0, layer.b_uc.shape))
        layer.threshold = 0.0
        keep = layer.keep_probability().numpy()
        layer.threshold = float(np.quantile(keep, 1 / 3))
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for weight in layer.weights:
                weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
    return backbone


def logits_and_input_gradient(logits_fn, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = logits_fn(x)
        loss = tf.reduce_sum(logits * tf.range(1.0, 11.0))
    return logits.numpy(), tape.gradient(loss, x).numpy()


def batch_products(logits_fn, shape):
    """Elementwise products over a whole batch in the forward graph: a mask multiplying an
    activation, or batch norm scaling it (Keras' inference BN is Sub, Mul, Add)."""
    graph = tf.function(logits_fn).get_concrete_function(tf.TensorSpec((8,) + shape)).graph
    return sum(1 for op in graph.get_operations()
               if op.type == "Mul" and op.outputs[0].shape.rank and op.outputs[0].shape[0] == 8)


@pytest.mark.parametrize("prunable", [True, False], ids=["masks", "plain"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_folded_network_equals_the_deployed_one(name, prunable):
    keras.utils.set_random_seed(0)
    backbone = randomize(models.build_model(name, SHAPES[name], 10, prunable=prunable))
    x = tf.random.stateless_uniform((8,) + SHAPES[name], [0, 1])
    deployed = lambda images: models.split_outputs(backbone(images, training=False))[0]  # noqa: E731
    expected_logits, expected_gradient = logits_and_input_gradient(deployed, x)
    logits, gradient = logits_and_input_gradient(folded_logits(backbone), x)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5 * np.abs(expected_logits).max())
    # The network is piecewise linear: with equal logits, an example's gradient differs
    # only where rounding moved a ReLU or max-pool kink, which reroutes part of that one
    # example's gradient (once 1.6% of the whole batch's gradient norm for VGG-16, when
    # the tests ran in another order); a wrong fold changes every example's.
    per_example = lambda g: g.reshape(len(g), -1)  # noqa: E731
    errors = (np.linalg.norm(per_example(gradient - expected_gradient), axis=1)
              / np.linalg.norm(per_example(expected_gradient), axis=1))
    assert np.median(errors) < 1e-3, errors


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_folded_graph_has_no_per_activation_products(name):
    backbone = models.build_model(name, SHAPES[name], 10, prunable=True)
    scalings = len(beta_bernoulli_layers(backbone)) + sum(
        isinstance(layer, keras.layers.BatchNormalization) for layer in backbone.layers)
    deployed = lambda images: models.split_outputs(backbone(images, training=False))[0]  # noqa: E731
    assert batch_products(deployed, SHAPES[name]) >= scalings
    assert batch_products(folded_logits(backbone), SHAPES[name]) == 0


def test_a_few_channel_conv_takes_the_max_pool_after_its_relu_where_chosen():
    with_pool = kernels.KernelChoice(conv_relu_pool=True)
    for prunable in (False, True):
        backbone = models.build_model("lenet5_caffe", prunable=prunable)
        chains = _plan(backbone, with_pool)[2].values()
        pooled = [[layer.name for layer in chain.layers()] for chain in chains if chain.pool is not None]
        assert pooled == [["conv1", "conv1_bbd", "pool1"] if prunable else ["conv1", "pool1"]]
        assert not any(chain.pool for chain in _plan(backbone, kernels.PLAIN)[2].values())
    # VGG-16's conv1 is followed by batch norm, ReLU and conv2, its pools by wide convs.
    assert not any(chain.pool for chain in _plan(models.build_model("vgg16", prunable=True), with_pool)[2].values())


def test_what_no_rule_fits_runs_as_it_is():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh", name="tanh")(inputs)   # not positively homogeneous
    masked = BetaBernoulliDropout(name="latent_bbd", seed=0)(hidden)         # so the mask multiplies
    normed = keras.layers.BatchNormalization(name="after_tanh")(masked)      # and BN follows no linear layer
    logits = keras.layers.Dense(10, name="logits")(normed)
    backbone = randomize(keras.Model(inputs, {"logits": logits, "latents": [masked]}))
    x = tf.random.stateless_uniform((4, 6), [2, 3])
    np.testing.assert_allclose(folded_logits(backbone)(x).numpy(),
                               backbone(x, training=False)["logits"].numpy(), rtol=1e-5, atol=1e-6)
    assert batch_products(folded_logits(backbone), (6,)) >= 2  # the mask and the BN scale


def test_training_attack_is_unchanged_by_folding():
    """RobustModel.attack folds; PGD on the unfolded network from the same start agrees."""
    keras.utils.set_random_seed(0)
    method = get_method("anp_vs", beta_kl=4.0, lambda_vs=1e-3, num_train_examples=1000)
    backbone = randomize(models.build_model("lenet5_caffe", prunable=True))
    model = RobustModel(backbone, method, adversary=attacks.PGD(0.3, 0.01, 10), seed=0)
    x = tf.random.stateless_uniform((16, 28, 28, 1), [4, 5])
    y = tf.argmax(model.inference_logits(x), -1)
    seed = tf.constant([7, 8])
    folded = model.attack(x, y, seed=seed).numpy()
    unfolded = model.adversary(model.inference_logits, x, y, seed).numpy()
    # The same signs of the same gradient: equal up to a step where a gradient entry is ~0.
    assert np.mean(np.abs(folded - unfolded) < 1e-6) > 0.999
    assert np.max(np.abs(folded - x.numpy())) <= 0.3 + 1e-6
