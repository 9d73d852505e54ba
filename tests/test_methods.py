"""Every method of the paper's table trains a few steps on real MNIST and shows what makes it itself."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, models
from anp_vs_tf.trainers import RobustModel, get_method
from anp_vs_tf.trainers.trades import prediction_kl

HPARAMS = dict(beta_kl=4.0, lambda_vs=0.5, adv_weight=2.0, weight_decay=1e-4, num_train_examples=6000)


class CountingPGD(attacks.PGD):
    """A PGD that counts its calls inside the compiled step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = tf.Variable(0)

    def __call__(self, logits_fn, x, y, seed=None):
        self.calls.assign_add(1)
        return super().__call__(logits_fn, x, y, seed)


def build(method, backbone=None, **options):
    keras.utils.set_random_seed(0)
    method = get_method(method, **HPARAMS, **options)
    if backbone is None:
        backbone = models.lenet5_caffe(prunable=method.prunes, mask_kwargs=dict(a_init=2.0))
    adversary = CountingPGD(0.3, 0.1, 3)
    model = RobustModel(backbone, method, adversary=adversary if method.adversarial else None, seed=0)
    model.compile(keras.optimizers.Adam(1e-3))
    return model, adversary


def step_terms(model, x, y, seed=0):
    """The loss terms of one step computed by hand from the model's own pieces."""
    x, y = tf.constant(x), tf.constant(y)
    x_adv = model.method.adversarial_examples(model, x, y, tf.constant([seed, 1]))
    views = model.forward_views(x, x_adv, tf.constant([seed, 2]))
    return x_adv, views, model.method.losses(model, views, y)


def test_standard_trains_on_clean_examples_only(mnist_subset):
    x, y, _, _ = mnist_subset
    model, _ = build("standard")
    history = model.fit(x[:512], y[:512], batch_size=128, epochs=1, verbose=0)
    assert "ce_adv" not in history.history and "mask_loss" not in history.history
    x_adv, _, terms = step_terms(model, x[:64], y[:64])
    assert x_adv is None
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"]) + 1e-4 * float(model.kernel_l2()), rel=1e-5)


def test_bp_learns_masks_without_an_attack(mnist_subset):
    x, y, _, _ = mnist_subset
    model, _ = build("bp")
    before = [v.numpy().copy() for v in model.mask_variables]
    model.fit(x[:512], y[:512], batch_size=128, epochs=1, verbose=0)
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.mask_variables))
    x_adv, views, terms = step_terms(model, x[:64], y[:64])
    assert x_adv is None and views.logits_adv is None
    kl_term = 4.0 * float(model.kl_divergence()) / 6000
    assert float(terms["mask_loss"]) == pytest.approx(
        float(terms["ce"]) + kl_term + 1e-4 * float(model.kernel_l2()), rel=1e-5
    )


@pytest.mark.parametrize("method", ["at", "at_vs", "anp", "anp_vs", "pre_at"])
def test_adversarial_methods_attack_every_step_and_weigh_the_adversarial_loss(mnist_subset, method):
    x, y, _, _ = mnist_subset
    model, adversary = build(method)
    model.fit(x[:512], y[:512], batch_size=128, epochs=1, verbose=0)
    assert int(adversary.calls) == 4  # one attack per training step
    x_adv, views, terms = step_terms(model, x[:64], y[:64])
    assert float(tf.reduce_max(tf.abs(x_adv - x[:64]))) > 0.2
    classification = (float(terms["ce"]) + 2 * float(terms["ce_adv"])) / 3
    expected = classification + 1e-4 * float(model.kernel_l2())
    if model.method.prunes:
        expected += 4.0 * float(model.kl_divergence()) / 6000
    if method in ("at_vs", "anp_vs"):
        expected += 0.5 * float(terms["vulnerability"])
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["ce_adv"]) > float(terms["ce"])
    assert ("mask_loss" in terms) == (method in ("anp", "anp_vs"))


def test_trades_regularizer_is_the_kl_between_clean_and_adversarial_predictions(mnist_subset):
    x, y, _, _ = mnist_subset
    model, _ = build("trades", beta_trades=6.0)
    model.fit(x[:512], y[:512], batch_size=128, epochs=1, verbose=0)
    x_adv, views, terms = step_terms(model, x[:64], y[:64])
    p = tf.nn.softmax(views.logits).numpy().astype(np.float64)
    q = tf.nn.softmax(views.logits_adv).numpy().astype(np.float64)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    assert float(terms["trades_kl"]) == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert float(terms["loss"]) == pytest.approx(
        float(terms["ce"]) + 6.0 * kl + 1e-4 * float(model.kernel_l2()), rel=1e-4
    )
    # Its attack maximizes that KL: far larger than for random noise of the same size.
    noise = tf.clip_by_value(x[:64] + 0.3 * tf.sign(tf.random.normal(x[:64].shape, seed=1)), 0.0, 1.0)
    logits = model.inference_logits(tf.constant(x[:64]))
    assert float(prediction_kl(logits, model.inference_logits(x_adv))) > 3 * float(
        prediction_kl(logits, model.inference_logits(noise))
    )


def test_admm_hard_prunes_to_the_target_sparsity_and_keeps_pruned_weights_at_zero(mnist_subset):
    x, y, _, _ = mnist_subset
    model, _ = build("admm", weight_sparsity=0.8, admm_fraction=0.5)
    seen = {}

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = [k.numpy().copy() for k in model.kernel_variables]

    history = model.fit(x[:512], y[:512], batch_size=128, epochs=4, verbose=0, callbacks=[Watch()])
    # Epochs 0-1: ADMM with its penalty; pruned at the end of epoch 1; epochs 2-3 retrain.
    assert all(p > 0 for p in history.history["admm_penalty"])
    for kernel in seen[0]:
        assert np.mean(kernel == 0) < 0.01
    masks = [m.numpy() for m in model.method_state["mask"]]
    for mask, kernel in zip(masks, model.kernel_variables):
        assert np.mean(mask == 0) == pytest.approx(0.8, abs=0.01)  # every layer meets the budget
    for epoch in (2, 3):
        for kernel, mask in zip(seen[epoch], masks):
            assert np.all(kernel[mask == 0] == 0.0)  # still zero after retraining steps
            assert np.mean(kernel[mask == 1] != 0.0) > 0.99
    assert float(model.weight_sparsity()) == pytest.approx(80.0, abs=1.0)
    assert int(model.method_state["phase"]) == 1


def test_at_bnn_predicts_with_sampled_weights_and_a_positive_kl(mnist_subset):
    x, y, x_test, _ = mnist_subset
    backbone = models.lenet5_caffe(bayesian_kwargs=dict(prior_stddev=1.0, init_rho=-3.0, seed=0))
    model, adversary = build("at_bnn", backbone=backbone, bnn_kl_weight=100.0, bnn_samples=4)
    model.fit(x[:512], y[:512], batch_size=128, epochs=1, verbose=0)
    assert int(adversary.calls) == 4
    x_test = tf.constant(x_test[:200])
    one_draw = [model.logits_and_latents(x_test)[0].numpy() for _ in range(2)]
    assert not np.allclose(one_draw[0], one_draw[1])  # each call is a new network
    averaged = [model.inference_logits(x_test).numpy() for _ in range(2)]
    # Averaging 4 draws shrinks the spread between two predictions by about 2.
    spread_one = np.std(one_draw[0] - one_draw[1])
    spread_avg = np.std(averaged[0] - averaged[1])
    assert spread_avg < 0.75 * spread_one
    x_adv, views, terms = step_terms(model, x[:64], y[:64])
    assert float(terms["weight_kl"]) > 0
    classification = (float(terms["ce"]) + 2 * float(terms["ce_adv"])) / 3
    assert float(terms["loss"]) == pytest.approx(
        classification + float(terms["weight_kl"]) / (6000 * 100.0), rel=1e-5
    )
    with pytest.raises(ValueError, match="Gaussian weights"):
        RobustModel(models.lenet5_caffe(), get_method("at_bnn", **HPARAMS), adversary=adversary)


def test_pre_at_starts_from_the_pretrained_weights(trained_lenet, tmp_path):
    from anp_vs_tf import building
    from anp_vs_tf.config import ConfigError, RunConfig
    from anp_vs_tf.data import DataInfo

    path = tmp_path / "base.keras"
    trained_lenet.save(path)
    info = DataInfo(name="mnist", input_shape=(28, 28, 1), num_classes=10, class_names=tuple("0123456789"),
                    num_train=6000, num_test=1000, num_validation=0, source="test")
    config = RunConfig(method="pre_at", init_from=str(path), pgd_steps=3, step_size=0.1).resolved()
    model = building.build(config, info, init_from=config.init_from)
    assert model.method.name == "pre_at" and model.method.adversarial
    for a, b in zip(trained_lenet.backbone.weights, model.backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ConfigError, match="pretrained"):
        RunConfig(method="pre_at").resolved()
