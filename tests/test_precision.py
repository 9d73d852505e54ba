"""Mixed precision: bfloat16 training, float32 measurement and export (anp_vs_tf.precision)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks, experiment, models, precision
from anp_vs_tf.config import RunConfig
from anp_vs_tf.export import export
from anp_vs_tf.layers import BetaBernoulliDropout
from anp_vs_tf.metrics.robustness import attack_evaluation
from anp_vs_tf.trainers import RobustModel, get_method, load_robust_model


def robust_lenet(method_name, policy, seed=0, num_train_examples=6000):
    keras.utils.set_random_seed(seed)
    with precision.dtype_policy(policy):
        method = get_method(method_name, beta_kl=4.0, lambda_vs=1e-3, num_train_examples=num_train_examples)
        backbone = models.build_model("lenet5_caffe", (28, 28, 1), 10, prunable=method.prunes)
    adversary = attacks.PGD(0.3, 0.1, 3) if method.adversarial else None
    model = RobustModel(backbone, method, adversary=adversary, seed=seed)
    model.compile(keras.optimizers.Adam(1e-3))
    return model


def test_policy_block_restores_the_global_policy():
    with precision.dtype_policy("mixed_bfloat16"):
        inside = keras.layers.Dense(2)
    assert inside.compute_dtype == "bfloat16" and inside.variable_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"


def test_masks_sample_and_keep_their_kl_in_float32():
    layer = BetaBernoulliDropout(seed=0, dtype="mixed_bfloat16")
    x = tf.random.uniform((4, 6, 6, 3), seed=1)
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32)) + layer.kl_divergence()
    assert y.dtype == tf.bfloat16 and layer.a_uc.dtype == "float32"
    assert layer.kl_divergence().dtype == tf.float32 and layer.keep_probability().dtype == tf.float32
    gradients = tape.gradient(loss, layer.mask_variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in gradients)


def test_float32_copy_is_the_same_network_in_float32():
    mixed = robust_lenet("anp_vs", "mixed_bfloat16")
    reference = robust_lenet("anp_vs", "float32", seed=1)  # other weights, then overwritten
    reference.set_weights(mixed.get_weights())
    copy = precision.float32_copy(mixed)
    assert precision.compute_dtypes(mixed) == {"bfloat16"}
    assert precision.compute_dtypes(copy) == {"float32"}
    assert (copy.method.name, copy.seed, copy.adversary.get_config()) == (
        "anp_vs", mixed.seed, mixed.adversary.get_config())
    x = tf.random.stateless_uniform((16, 28, 28, 1), [0, 1])
    exact = reference.inference_logits(x).numpy()
    np.testing.assert_allclose(copy.inference_logits(x).numpy(), exact, rtol=1e-6, atol=1e-6)
    # bfloat16 keeps 8 bits of mantissa: the mixed model agrees to about 1% of the logits' scale.
    approx = tf.cast(mixed.inference_logits(x), tf.float32).numpy()
    assert np.max(np.abs(approx - exact)) < 0.02 * np.max(np.abs(exact))
    assert precision.float32_copy(reference) is reference


def test_a_mixed_step_computes_the_float32_loss_terms():
    x = tf.random.stateless_uniform((32, 28, 28, 1), [2, 3])
    y = tf.random.stateless_uniform((32,), [4, 5], 0, 10, tf.int32)
    logs, start = {}, robust_lenet("anp_vs", "float32").get_weights()
    for policy in ("float32", "mixed_bfloat16"):
        model = robust_lenet("anp_vs", policy)
        model.set_weights(start)  # the same weights, masks and seeds in both
        logs[policy] = {k: float(v) for k, v in model.train_step((x, y)).items()}
        assert all(v.dtype == "float32" for v in model.weights)
    kl_terms = [k for k in logs["float32"] if "kl" in k]
    assert kl_terms, logs["float32"]
    losses = {k: v for k, v in logs["float32"].items() if not k.startswith("acc")}  # accuracies are counts
    for name, value in losses.items():
        tolerance = 1e-6 if name in kl_terms else 0.05  # the KL comes from float32 variables alone
        assert logs["mixed_bfloat16"][name] == pytest.approx(value, rel=tolerance, abs=1e-4), name


@pytest.mark.slow
def test_mixed_adversarial_training_learns_like_float32(mnist_subset):
    """Two epochs of AT on real MNIST: bfloat16 lands where float32 does, within seed noise
    (two float32 seeds differ by ~1.3 points clean and ~1.2 robust here).

    Slow (~2.5 min on a 2-core AVX2 CPU without bfloat16 arithmetic, the longest test);
    the loss terms of a mixed step are checked against float32 on every run
    (test_a_mixed_step_computes_the_float32_loss_terms)."""
    x, y, x_test, y_test = mnist_subset
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(500)
    results = {}
    for policy in ("float32", "mixed_bfloat16"):
        model = robust_lenet("at", policy)
        model.fit(x, y, batch_size=128, epochs=2, verbose=0)
        results[policy] = attack_evaluation(precision.float32_copy(model), test, attacks.PGD(0.3, 0.03, 10))
    full, mixed = results["float32"], results["mixed_bfloat16"]
    assert full["acc"] > 0.9 and full["acc_adv"] > 0.25, full
    assert abs(mixed["acc"] - full["acc"]) < 0.03, (full, mixed)
    assert abs(mixed["acc_adv"] - full["acc_adv"]) < 0.04, (full, mixed)


def test_float16_is_refused_with_what_to_use():
    with precision.dtype_policy("mixed_float16"):
        backbone = models.build_model("lenet5_caffe", (28, 28, 1), 10)
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        RobustModel(backbone, "standard")


def test_run_flag_builds_mixed_and_measures_and_exports_float32(data_dir, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(experiment.evaluation, "attack_evaluation", _spy(measured))
    config = RunConfig(method="at", data_dir=str(data_dir), out_dir=str(tmp_path / "run"), train_subset=256,
                       test_subset=100, epochs=1, pgd_steps=2, eval_pgd_steps=2, fgsm=False,
                       sanity_examples=0, plots=False, verbose=0, mixed_precision=True)
    experiment.run(config)
    saved = load_robust_model(str(tmp_path / "run" / "model.keras"))
    assert "bfloat16" in precision.compute_dtypes(saved)
    assert measured and all(dtypes == {"float32"} for dtypes in measured)
    assert keras.config.dtype_policy().name == "float32"
    report = export(saved, str(tmp_path / "serving"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "serving" / "1"))
    images = tf.random.stateless_uniform((3, 28, 28, 1), [6, 7])
    outputs = served.signatures["serving_default"](images=images)
    expected = precision.float32_copy(saved).inference_logits(images).numpy()
    assert all(t.dtype == tf.float32 for t in outputs.values())
    np.testing.assert_allclose(outputs["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert report["check"]["max_abs_logit_diff"] < 1e-5


def _spy(measured):
    real = attack_evaluation

    def spy(model, *args, **kwargs):
        measured.append(precision.compute_dtypes(model))
        return real(model, *args, **kwargs)

    return spy
