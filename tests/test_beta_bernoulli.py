"""The Beta-Bernoulli dropout layer against independent computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import stats

from anp_vs_tf.layers import (
    BetaBernoulliDropout,
    concrete_sample,
    kumaraswamy_beta_kl,
    kumaraswamy_sample,
    sampling,
)

tfd = tfp.distributions

AB_PAIRS = [(0.3, 1.0), (1.0, 1.0), (2.0, 3.0), (0.5, 2.5), (5.0, 0.8)]


def make_layer(units=6, a_init=2.0, b_init=1.5, **kwargs):
    layer = BetaBernoulliDropout(a_init=a_init, b_init=b_init, seed=3, **kwargs)
    layer.build((None, units))
    return layer


@pytest.mark.parametrize("a,b", AB_PAIRS)
def test_closed_form_kl_matches_monte_carlo(a, b):
    """KL(q || p) = E_q[log q - log p], estimated with 20,000 samples (TFP log densities)."""
    alpha = 1e-4
    q = tfd.Kumaraswamy(tf.constant(a, tf.float64), tf.constant(b, tf.float64))
    p = tfd.Beta(tf.constant(alpha, tf.float64), tf.constant(1.0, tf.float64))
    pi = q.sample(20_000, seed=(7, 11))
    pi = tf.clip_by_value(pi, 1e-300, 1.0 - 1e-16)
    monte_carlo = float(tf.reduce_mean(q.log_prob(pi) - p.log_prob(pi)))
    closed = float(kumaraswamy_beta_kl(tf.constant(a, tf.float64), tf.constant(b, tf.float64), alpha))
    assert closed == pytest.approx(monte_carlo, rel=0.05)


def test_layer_kl_is_the_sum_over_units():
    layer = make_layer()
    a, b = (t.numpy() for t in layer.concentrations())
    expected = sum(float(kumaraswamy_beta_kl(tf.constant(x), tf.constant(y), 1e-4)) for x, y in zip(a, b))
    assert float(layer.kl_divergence()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("a,b", AB_PAIRS)
def test_keep_probability_matches_the_sample_mean(a, b):
    """E_q[pi] against the mean of inverse-CDF samples drawn in numpy."""
    layer = make_layer(units=1, a_init=a, b_init=b)
    u = np.random.default_rng(0).uniform(size=200_000)
    samples = (1.0 - (1.0 - u) ** (1.0 / b)) ** (1.0 / a)
    standard_error = samples.std() / np.sqrt(samples.size)
    assert float(layer.keep_probability()[0]) == pytest.approx(samples.mean(), abs=4 * standard_error + 1e-6)


@pytest.mark.parametrize("a,b", AB_PAIRS)
def test_kumaraswamy_sample_has_the_kumaraswamy_distribution(a, b):
    """Our log-space inverse CDF against numpy's direct formula on the same noise, and
    its draws against TFP's Kumaraswamy CDF (Kolmogorov-Smirnov)."""
    u = np.random.default_rng(1).uniform(size=20_000)
    ours = kumaraswamy_sample(tf.constant(a, tf.float64), tf.constant(b, tf.float64), tf.constant(u)).numpy()
    direct = (1.0 - (1.0 - np.clip(u, 1e-6, 1 - 1e-6)) ** (1.0 / b)) ** (1.0 / a)
    np.testing.assert_allclose(ours, direct, rtol=1e-9, atol=1e-300)
    cdf = tfd.Kumaraswamy(tf.constant(a, tf.float64), tf.constant(b, tf.float64)).cdf
    assert stats.kstest(ours, lambda x: cdf(tf.constant(x)).numpy()).pvalue > 0.01


def test_kumaraswamy_gradient_is_finite_at_the_ends_of_the_noise():
    """u = 0 is drawn about once in 10^7: TFP's sampler then has a NaN gradient in a for
    a pruned unit (a near alpha), which ended a 16-epoch run; ours stays finite."""
    u = tf.constant([0.0, 1e-12, 0.5, 1.0 - 1e-7, 1.0])
    for a_value in (1e-4, 0.3, 10.0):
        a, b = tf.Variable(tf.fill([5], a_value)), tf.Variable(tf.ones([5]))
        with tf.GradientTape() as tape:
            pi = kumaraswamy_sample(a, b, u)
            total = tf.reduce_sum(pi)
        grads = tape.gradient(total, [a, b])
        assert np.all(np.isfinite(pi.numpy())) and np.all((pi.numpy() >= 0) & (pi.numpy() <= 1))
        assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_training_masks_are_near_binary():
    layer = make_layer(units=8, a_init=1.0, b_init=1.0)
    z = layer(tf.ones((4000, 8)), training=True).numpy()
    assert z.min() >= 0.0 and z.max() <= 1.0
    # tau = 0.1: z lands in (0.1, 0.9) only if logit(pi) + logistic noise is within
    # +-0.22 of zero, which has probability at most 0.44 * 0.25 = 0.11.
    assert np.mean((z > 0.1) & (z < 0.9)) < 0.12


@pytest.mark.parametrize("pi", [0.05, 0.37, 0.9])
def test_concrete_sample_has_the_relaxed_bernoulli_distribution(pi):
    ours = concrete_sample(tf.constant(pi), 0.1, 4000, tf.constant([5, 9])).numpy()
    reference = tfd.RelaxedBernoulli(0.1, probs=pi).sample(4000, seed=(1, 2)).numpy()
    assert stats.ks_2samp(ours, reference).pvalue > 0.001
    assert np.mean(ours > 0.5) == pytest.approx(pi, abs=0.03)


def test_temperature_controls_how_binary_the_mask_is():
    hot = make_layer(units=8, a_init=1.0, b_init=1.0, temperature=1.0)
    cold = make_layer(units=8, a_init=1.0, b_init=1.0, temperature=0.1)
    x = tf.ones((2000, 8))

    def middle(layer):
        z = layer(x, training=True).numpy()
        return np.mean((z > 0.1) & (z < 0.9))

    assert middle(cold) < 0.5 * middle(hot)


def test_inference_mask_is_deterministic_and_equals_the_expectation():
    layer = make_layer(units=5)
    x = tf.random.uniform((3, 7, 7, 5), seed=1)
    first, second = layer(x).numpy(), layer(x).numpy()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, x.numpy() * layer.keep_probability().numpy(), rtol=1e-6)


def test_pruned_units_output_exactly_zero_at_inference():
    layer = make_layer(units=5)
    layer.a_uc.assign([-10.0, 0.5, -10.0, 1.0, 2.0])  # a = softplus(-10): E[pi] ~ 4e-5
    x = tf.random.uniform((2, 4, 4, 5), 0.5, 1.0, seed=2)
    y = layer(x).numpy()
    assert np.all(y[..., [0, 2]] == 0.0)
    assert np.all(y[..., [1, 3, 4]] > 0.0)
    np.testing.assert_array_equal(layer.active_mask().numpy(), [False, True, False, True, True])
    assert int(layer.num_active()) == 3


def test_conv_masks_are_per_example_and_channel():
    layer = make_layer(units=4, a_init=1.0, b_init=1.0)
    y = layer(tf.ones((6, 5, 5, 4)), training=True).numpy()
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1, :1, :], y.shape))
    assert not np.allclose(y[0], y[1])  # examples draw their own masks


def test_a_shared_sample_reuses_one_mask_per_example():
    layer = make_layer(units=16, a_init=1.0, b_init=1.0)
    x = tf.random.uniform((5, 16), 0.5, 1.0, seed=3)
    with sampling(shared_batch_size=5):
        stacked = layer(tf.concat([x, x], 0), training=True).numpy()
        separate = layer(x, training=True).numpy()
    np.testing.assert_array_equal(stacked[:5], stacked[5:])
    np.testing.assert_array_equal(stacked[:5], separate)
    outside = layer(tf.concat([x, x], 0), training=True).numpy()
    assert not np.allclose(outside[:5], outside[5:])


def test_mask_gradients_stay_finite():
    """Saturated concrete samples must not turn the mask gradient into NaN."""
    layer = make_layer(units=500, a_init=0.6, b_init=1.0)
    x = tf.random.uniform((128, 500))
    for _ in range(10):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True)) + layer.kl_divergence()
        for grad in tape.gradient(loss, layer.mask_variables):
            assert np.all(np.isfinite(grad.numpy()))


def test_config_round_trip_inside_a_model(tmp_path):
    inputs = keras.Input((3,))
    outputs = BetaBernoulliDropout(alpha=1e-3, temperature=0.2, threshold=1e-2, a_init=0.7, name="bbd")(inputs)
    model = keras.Model(inputs, outputs)
    model.get_layer("bbd").a_uc.assign([-10.0, 0.1, 3.0])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("bbd")
    assert (layer.alpha, layer.temperature, layer.threshold, layer.a_init) == (1e-3, 0.2, 1e-2, 0.7)
    x = np.random.default_rng(0).uniform(size=(4, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_bad_arguments_and_shapes_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        BetaBernoulliDropout(alpha=0)
    with pytest.raises(ValueError, match="dense"):
        BetaBernoulliDropout()(tf.ones((2, 3, 4)))
