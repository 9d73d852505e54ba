"""The evaluation suite: our PGD against cleverhans', transfer and EOT attacks, the
gradient-masking checks, and the full metrics dict."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

from anp_vs_tf import attacks, evaluation, models
from anp_vs_tf.metrics import attack_evaluation, gradient_masking
from anp_vs_tf.trainers import RobustModel, get_method


def robust_accuracy(model, x, y, x_adv):
    predictions = np.argmax(model.inference_logits(tf.constant(x_adv)).numpy(), axis=1)
    return float(np.mean(predictions == y))


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.01), ("l2", 1.5, 0.1)])
def test_our_pgd_agrees_with_cleverhans_within_one_point(trained_lenet, mnist_subset, norm, eps, step):
    """Same model, same 1,000 real test images, same settings: robust accuracy within 1 point."""
    _, _, x, y = mnist_subset
    ours = attacks.PGD(eps, step, 40, norm=norm)
    x_ours = np.concatenate([
        ours(trained_lenet.inference_logits, x[i:i + 500], y[i:i + 500], tf.constant([i, 1])).numpy()
        for i in (0, 500)
    ])
    theirs = tf.function(lambda xb, yb: projected_gradient_descent(
        trained_lenet.inference_logits, xb, eps, step, 40, np.inf if norm == "linf" else 2,
        clip_min=0.0, clip_max=1.0, y=yb, rand_init=True, sanity_checks=False,
    ))
    x_theirs = np.concatenate([theirs(tf.constant(x[i:i + 500]), tf.constant(y[i:i + 500])).numpy()
                               for i in (0, 500)])
    acc_ours, acc_theirs = robust_accuracy(trained_lenet, x, y, x_ours), robust_accuracy(trained_lenet, x, y, x_theirs)
    clean = robust_accuracy(trained_lenet, x, y, x)
    assert clean - acc_ours > 0.1  # the attack does something at this eps ...
    assert acc_ours > 0.02  # ... without saturating, so the comparison means something
    assert abs(acc_ours - acc_theirs) <= 0.01, (acc_ours, acc_theirs)


def test_transfer_attack_uses_the_source_gradients_only(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    x, y = tf.constant(x[:64]), tf.constant(y[:64])
    pgd = attacks.PGD(0.3, 0.05, 5)
    seed = tf.constant([4, 2])
    target = RobustModel(models.lenet5_caffe(), "standard")  # untrained: its gradients differ
    transferred = attacks.TransferAttack(trained_lenet, pgd)(target.inference_logits, x, y, seed)
    np.testing.assert_array_equal(transferred.numpy(), pgd(trained_lenet.inference_logits, x, y, seed).numpy())


def test_eot_averages_the_gradient_over_stochastic_calls():
    """Draws alternate between +1 and -3 times one linear model: the average points the other way."""
    kernel = tf.constant(np.random.default_rng(0).normal(size=(16, 3)), tf.float32)
    calls = tf.Variable(0.0)

    def stochastic_logits(x):
        calls.assign_add(1.0)
        sign = tf.where(tf.equal(tf.math.floormod(calls, 2.0), 1.0), 1.0, -3.0)
        return sign * tf.matmul(tf.reshape(x, (-1, 16)), kernel)

    def first_logit(y, logits):  # linear in the logits, so the gradients simply add up
        return logits[:, 0]

    x, y = tf.fill((4, 4, 4, 1), 0.5), tf.constant([0, 1, 2, 0])
    # One chunk: the draws are counted calls, and two chunks would each make their own.
    single = attacks.PGD(0.1, 0.1, 1, random_start=False, loss_fn=first_logit, chunks=1)
    calls.assign(0.0)
    step_single = single(stochastic_logits, x, y) - x
    eot = attacks.PGD(0.1, 0.1, 1, random_start=False, loss_fn=first_logit, eot_samples=2, chunks=1)
    calls.assign(0.0)
    step_eot = eot(stochastic_logits, x, y) - x
    assert float(calls) == 2.0
    np.testing.assert_allclose(step_eot.numpy(), -step_single.numpy(), atol=1e-6)


def test_robust_model_attacks_the_stochastic_network_for_eot(mnist_subset):
    x = tf.constant(mnist_subset[2][:8])
    backbone = models.lenet5_caffe(prunable=True, mask_kwargs=dict(a_init=1.0))
    model = RobustModel(backbone, get_method("bp", num_train_examples=100))
    deterministic = model.inference_logits(x).numpy()
    np.testing.assert_array_equal(deterministic, model.inference_logits(x).numpy())
    assert not np.allclose(model.stochastic_logits(x).numpy(), model.stochastic_logits(x).numpy())


# -- gradient masking -------------------------------------------------------------------


def test_each_check_passes_and_fails_on_the_numbers():
    gm = gradient_masking
    assert gm.accuracy_falls_with_eps([0.1, 0.2, 0.3], [0.9, 0.6, 0.605])["passed"]
    assert not gm.accuracy_falls_with_eps([0.1, 0.2, 0.3], [0.9, 0.6, 0.7])["passed"]
    assert gm.pgd_stronger_than_fgsm(0.50, 0.55)["passed"]
    assert not gm.pgd_stronger_than_fgsm(0.60, 0.55)["passed"]
    assert gm.unbounded_attack_succeeds(1.0, 0.01)["passed"]
    assert not gm.unbounded_attack_succeeds(1.0, 0.10)["passed"]
    assert gm.more_steps_not_weaker([40, 80], [0.5, 0.48])["passed"]
    assert not gm.more_steps_not_weaker([40, 80], [0.5, 0.6])["passed"]


def small_test_set(mnist_subset, n=500):
    _, _, x, y = mnist_subset
    return tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).batch(250)


def test_checks_pass_for_a_plain_network(trained_lenet, mnist_subset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = gradient_masking.gradient_masking_checks(
            trained_lenet, small_test_set(mnist_subset), attacks.PGD(0.1, 0.01, 20), examples=500
        )
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    assert checks["all_passed"], checks
    assert checks["examples"] == 500
    acc = checks["accuracy_falls_with_eps"]["acc"]
    assert acc[0] > acc[-1]  # eps 0.025 leaves far more than eps 0.2
    assert checks["unbounded_attack_succeeds"]["acc"] <= 0.02


def test_checks_run_on_the_first_examples_as_a_data_set_of_known_length(mnist_subset):
    _, _, x, y = mnist_subset
    first = gradient_masking._first_examples(small_test_set(mnist_subset), 300, batch_size=200)
    assert int(first.cardinality()) == 2  # known, so Keras' evaluate() ends without a warning
    images, labels = zip(*first.as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate(images), x[:300])
    np.testing.assert_array_equal(np.concatenate(labels), y[:300])
    with pytest.raises(ValueError, match="empty data set"):
        gradient_masking._first_examples(small_test_set(mnist_subset).take(0), 300)


class ZeroGradient(keras.layers.Layer):
    """Quantizes the input and hides the gradient: the textbook case of gradient masking."""

    def call(self, x):
        return tf.stop_gradient(tf.round(x * 4.0) / 4.0) + 0.0 * x


def test_checks_catch_a_network_that_hides_its_gradient(trained_lenet, mnist_subset, caplog):
    inputs = keras.Input((28, 28, 1))
    masked = RobustModel(keras.Model(inputs, trained_lenet.backbone(ZeroGradient()(inputs))), "standard")
    with caplog.at_level("WARNING"):
        checks = gradient_masking.gradient_masking_checks(
            masked, small_test_set(mnist_subset), attacks.PGD(0.1, 0.01, 20), examples=500
        )
    assert not checks["unbounded_attack_succeeds"]["passed"]
    assert checks["unbounded_attack_succeeds"]["acc"] > 0.05
    assert not checks["all_passed"]
    assert "gradient-masking check unbounded_attack_succeeds failed" in caplog.text


# -- the whole suite ----------------------------------------------------------------------


def test_evaluate_reports_every_figure_and_restores_the_model(trained_lenet, mnist_subset):
    x, y, _, _ = mnist_subset
    keras.utils.set_random_seed(1)
    backbone = models.lenet5_caffe(prunable=True, mask_kwargs=dict(a_init=2.0))
    models.transfer_weights(trained_lenet.backbone, backbone)
    pruned = RobustModel(backbone, get_method("anp_vs", num_train_examples=6000, beta_kl=4, lambda_vs=1e-3),
                         adversary=attacks.PGD(0.3, 0.1, 2), seed=1)
    pruned.compile(keras.optimizers.Adam(1e-3))
    pruned.fit(x[:1024], y[:1024], batch_size=128, epochs=1, verbose=0)
    data = small_test_set(mnist_subset, 300)
    adversary = attacks.PGD(0.3, 0.05, 10)
    metrics = evaluation.evaluate(pruned, data, adversary, bb_source=trained_lenet, eot_samples=3,
                                  sanity_examples=300, verbose=0)
    for key in ("clean_acc", "pgd_acc", "fgsm_acc", "bb_acc", "eot_acc", "vulnerability_wb", "vulnerability_bb",
                "layer_vulnerability_wb", "feature_vulnerability_bb", "sanity", "sparsity_pct", "n_active",
                "params_kept_pct", "memory_pct", "flops_speedup", "eval_attack", "bb_attack"):
        assert key in metrics, key
    assert metrics["num_examples"] == 300
    assert metrics["eval_attack"]["steps"] == 10 and metrics["eot_attack"]["eot_samples"] == 3
    assert list(metrics["feature_vulnerability_wb"]) == ["conv1_bbd", "conv2_bbd", "dense1_bbd"]
    assert [len(v) for v in metrics["feature_vulnerability_wb"].values()] == [20, 50, 500]
    mean_of_layers = np.mean([np.mean(v) for v in metrics["feature_vulnerability_wb"].values()])
    assert metrics["vulnerability_wb"] == pytest.approx(mean_of_layers, rel=1e-5)
    assert metrics["pgd_acc"] <= metrics["fgsm_acc"] + 0.02
    assert pruned.eval_adversary is None  # evaluate() restored it, so the model still saves
    # The model's own evaluate() against the same attack gives the same clean accuracy.
    assert attack_evaluation(pruned, data, adversary)["acc"] == pytest.approx(metrics["clean_acc"])
