"""Masks folded into weights (models.folding): the same logits and input gradients, fewer ops."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, models
from anp_vs_tf.layers import BetaBernoulliDropout, beta_bernoulli_layers
from anp_vs_tf.models.folding import fold_plan, folded_logits
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


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_folded_network_equals_the_masked_one(name):
    keras.utils.set_random_seed(0)
    backbone = randomize(models.build_model(name, SHAPES[name], 10, prunable=True))
    x = tf.random.stateless_uniform((8,) + SHAPES[name], [0, 1])
    masked = lambda images: models.split_outputs(backbone(images, training=False))[0]  # noqa: E731
    expected_logits, expected_gradient = logits_and_input_gradient(masked, x)
    logits, gradient = logits_and_input_gradient(folded_logits(backbone), x)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5 * np.abs(expected_logits).max())
    # Rounding may move a ReLU or a max-pool tie on one unit: compare the whole gradient.
    error = np.linalg.norm(gradient - expected_gradient) / np.linalg.norm(expected_gradient)
    assert error < 1e-4, error
    # Every mask of the zoo has a rule; in the graph they run as a pass-through.
    assert len(fold_plan(backbone)) == len(beta_bernoulli_layers(backbone))


def test_which_weights_each_rule_scales():
    plan = {mask.name: [(v.path, how) for v, how in targets]
            for mask, targets in fold_plan(models.build_model("lenet5_caffe", prunable=True))}
    assert plan == {
        "conv1_bbd": [("conv1/kernel", "out"), ("conv1/bias", "out")],    # producer, relu
        "conv2_bbd": [("conv2/kernel", "out"), ("conv2/bias", "out")],
        "flatten_bbd": [("dense1/kernel", "in")],                         # consumer
        "dense1_bbd": [("dense1/kernel", "out"), ("dense1/bias", "out")],
    }
    vgg = {mask.name: [v.path for v, _ in targets]
           for mask, targets in fold_plan(models.build_model("vgg16", prunable=True))}
    assert vgg["conv1_bbd"] == ["bn1/gamma", "bn1/beta"]  # BN -> ReLU -> mask
    assert vgg["dense2_bbd"] == ["dense2_bn/gamma", "dense2_bn/beta"]


def test_a_mask_no_rule_fits_keeps_multiplying():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh", name="tanh")(inputs)  # not positively homogeneous
    latent = BetaBernoulliDropout(name="latent_bbd", seed=0)(hidden)        # and a model output
    logits = keras.layers.Dense(10, name="logits")(latent)
    backbone = randomize(keras.Model(inputs, {"logits": logits, "latents": [latent]}))
    assert fold_plan(backbone) == []
    x = tf.random.stateless_uniform((4, 6), [2, 3])
    np.testing.assert_allclose(folded_logits(backbone)(x).numpy(),
                               backbone(x, training=False)["logits"].numpy(), rtol=1e-6, atol=1e-7)


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
