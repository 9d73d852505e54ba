"""The package's stateless draws (`seeds.stateless_uniform`, `fold_in`, `split`) are
bit for bit TensorFlow's without XLA, and the same numbers under XLA.

(a) Without XLA, eagerly and in a `tf.function`: each helper against the TensorFlow or
    TFP call the package made before (kept here as `_old_*`), for many seeds including
    negative words, shapes (odd sizes, scalars, one large enough for TensorFlow's kernel
    to shard it) and ranges; the Beta-Bernoulli mask's sample and the Logistic noise
    of its relaxation against TFP's `tfd.Logistic(...).sample`; PGD's uniform random
    starts (L-infinity, and L2 whose Gaussian direction is unchanged too); the layer
    seeds of `layers.sampling` and RobustModel.step_seed.
(b) Inside `tf.function(jit_compile=True)`: the helpers give exactly the values without
    XLA; PGD's L-infinity start agrees to one float32 ulp (XLA fuses x + delta and the
    projection) and the masks to float rounding (XLA's log, log1p and exp are not
    Eigen's to the last bit); the uniform noise under both is equal.
"""

import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from anp_vs_tf import attacks, models, seeds
from anp_vs_tf.attacks.pgd import _per_example_l2
from anp_vs_tf.layers.sampling import Scope
from anp_vs_tf.layers.beta_bernoulli import (_PI_EPS, BetaBernoulliDropout, concrete_sample,
                                             kumaraswamy_sample)
from anp_vs_tf.trainers import RobustModel

tfd = tfp.distributions
TINY = float(np.finfo(np.float32).tiny)

# Seeds with negative words (where XLA's "auto_select" read them otherwise), the int32
# extremes, and random words over the whole int32 range.
EDGE_SEEDS = [[0, 0], [7, 3], [-409271666, 1], [5, -1], [-1, -1], [2**31 - 1, -2**31], [-2**31, 2**31 - 1]]
RANDOM_SEEDS = np.random.default_rng(0).integers(-2**31, 2**31, size=(25, 2)).tolist()
SEEDS = EDGE_SEEDS + RANDOM_SEEDS
# Scalars, sizes that are not a multiple of Philox's 4 words, batches of images, and
# one large enough that TensorFlow's CPU kernel splits it over threads.
SHAPES = [[], [1], [3], [5], [7, 3], [2, 5, 1, 3], [32, 28, 28, 1], [3, 40001]]
RANGES = [(0.0, 1.0), (-0.3, 0.3), (-8 / 255, 8 / 255), (TINY, 1.0), (-1e-3, 2.5), (2.0, 3.0), (-5.0, -4.75), (0, 1)]


def _seed(words):
    return tf.constant(words, tf.int32)


def _old_uniform(shape, seed, minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, seed, minval, maxval)


def _with_and_without_xla(fn):
    """A function of the same arguments returning fn's values (numpy) without XLA and under XLA."""
    graph, xla = tf.function(fn), tf.function(fn, jit_compile=True)

    def both(*args):
        return tuple(tf.nest.map_structure(lambda t: t.numpy(), f(*args)) for f in (graph, xla))

    return both


# -- (a) the helpers against TensorFlow's calls, without XLA ------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stateless_uniform_is_tensorflows_draw_bit_for_bit(shape):
    size = int(np.prod(shape))
    for minval, maxval in RANGES:
        @tf.function
        def draws(seed):
            return (_old_uniform(shape, seed, minval, maxval),
                    seeds.stateless_uniform(shape, seed, minval, maxval))

        for words in SEEDS if size < 10**5 else SEEDS[:8]:
            old, new = draws(_seed(words))
            assert new.dtype == tf.float32 and new.shape == shape
            np.testing.assert_array_equal(new.numpy(), old.numpy(), err_msg=f"{words} {minval} {maxval}")
            if size < 10**5 and words in EDGE_SEEDS:  # eagerly too
                np.testing.assert_array_equal(
                    seeds.stateless_uniform(shape, _seed(words), minval, maxval).numpy(), old.numpy())
            assert np.all((np.float32(minval) <= new.numpy()) & (new.numpy() <= np.float32(maxval)))


def test_stateless_uniform_defaults_dynamic_shapes_and_dtypes():
    seed = _seed([-12, 34])
    np.testing.assert_array_equal(seeds.stateless_uniform([9], seed).numpy(),
                                  tf.random.stateless_uniform([9], seed).numpy())
    # A shape tensor, as the package passes it (tf.concat of tf.shape parts).
    shape = tf.concat([[4], tf.shape(tf.zeros([3, 2]))], 0)
    np.testing.assert_array_equal(seeds.stateless_uniform(shape, seed, -2.0, 2.0).numpy(),
                                  tf.random.stateless_uniform(shape, seed, -2.0, 2.0).numpy())
    # An int64 seed and tensor bounds.
    seed64 = tf.constant([-3, 2**40], tf.int64)
    lo, hi = tf.constant(-0.25), tf.constant(0.5)
    np.testing.assert_array_equal(seeds.stateless_uniform([17], seed64, lo, hi).numpy(),
                                  tf.random.stateless_uniform([17], seed64, lo, hi).numpy())
    with pytest.raises(ValueError, match="float32"):
        seeds.stateless_uniform([2], seed, dtype=tf.float64)


def test_fold_in_and_split_are_tensorflows_seeds_bit_for_bit():
    @tf.function
    def draws(seed, data):
        return (tf.random.experimental.stateless_fold_in(seed, data), seeds.fold_in(seed, data),
                [tf.random.experimental.stateless_split(seed, n) for n in (1, 2, 3, 5)],
                [seeds.split(seed, n) for n in (1, 2, 3, 5)],
                tf.stack(tfp.random.split_seed(seed, n=2)))

    for words in SEEDS:
        for data in (0, 1, 3, 7, 2**31 - 1, zlib.crc32(b"conv1_mask") % (2**31 - 1)):
            old_fold, new_fold, old_splits, new_splits, tfp_split = draws(_seed(words), tf.constant(data))
            np.testing.assert_array_equal(new_fold.numpy(), old_fold.numpy())
            for old, new in zip(old_splits, new_splits):
                np.testing.assert_array_equal(new.numpy(), old.numpy())
            np.testing.assert_array_equal(new_splits[1].numpy(), tfp_split.numpy())  # the masks' old split
    assert seeds.fold_in(_seed([1, 2]), 5).dtype == tf.int32
    assert seeds.split(_seed([1, 2]), 4).shape == (4, 2)


def test_tfp_logistic_draws_tensorflows_uniform_of_the_same_seed():
    """What the relaxation's noise was: tfd.Logistic(loc, scale).sample(n, seed) is
    stateless_uniform([n, units], seed, tiny, 1) (no salt, no split), then TFP's formula."""
    loc = tf.constant(np.random.default_rng(1).normal(0, 20, size=13), tf.float32)
    scale = 10.0
    for words in SEEDS:
        seed = _seed(words)
        u = tf.random.stateless_uniform([6, 13], seed, TINY, 1.0)
        expected = (tf.math.log(u) - tf.math.log1p(-u)) * tf.constant(scale, tf.float32) + loc
        sampled = tfd.Logistic(loc, scale).sample(6, seed=seed)
        np.testing.assert_array_equal(sampled.numpy(), expected.numpy())


def _old_concrete_sample(pi, temperature, batch_size, seed):
    """concrete_sample as it was: TFP's Logistic."""
    pi = tf.clip_by_value(pi, _PI_EPS, 1.0 - _PI_EPS)
    logits = tf.math.log(pi) - tf.math.log1p(-pi)
    return tf.sigmoid(tfd.Logistic(logits / temperature, 1.0 / temperature).sample(batch_size, seed=seed))


def _old_sample_mask(layer, batch_size, seed):
    """BetaBernoulliDropout.sample_mask as it was: TFP's seed split and Logistic."""
    seed = tf.cast(tf.math.floormod(seed, 2**31 - 1), tf.int32)
    pi_seed, z_seed = tfp.random.split_seed(seed, n=2)
    a, b = layer.concentrations()
    pi = kumaraswamy_sample(a, b, tf.random.stateless_uniform(tf.shape(a), seed=pi_seed))
    return _old_concrete_sample(pi, layer.temperature, batch_size, z_seed)


def _mask_layer(units=37, temperature=0.1):
    layer = BetaBernoulliDropout(temperature=temperature, seed=0)
    layer(tf.zeros((1, units)))
    rng = np.random.default_rng(2)
    layer.a_uc.assign(rng.normal(0.0, 2.0, units).astype("float32"))
    layer.b_uc.assign(rng.normal(0.5, 2.0, units).astype("float32"))
    return layer


def test_concrete_sample_is_the_old_tfp_logistic_bit_for_bit():
    pi = tf.constant(np.random.default_rng(3).uniform(0, 1, size=21), tf.float32)
    for temperature in (0.1, 0.5, 2.0 / 3.0):
        @tf.function
        def both(seed, batch_size):
            return (_old_concrete_sample(pi, temperature, batch_size, seed),
                    concrete_sample(pi, temperature, batch_size, seed))

        for words in SEEDS:  # the seed reaches the uniform as it is, negative words too
            for batch_size in (1, 8):
                old, new = both(_seed(words), tf.constant(batch_size))
                assert new.shape == (batch_size, 21)
                np.testing.assert_array_equal(new.numpy(), old.numpy())
        np.testing.assert_array_equal(concrete_sample(pi, temperature, 5, _seed([-7, 9])).numpy(),
                                      _old_concrete_sample(pi, temperature, 5, _seed([-7, 9])).numpy())


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_mask_sample_is_unchanged_bit_for_bit(temperature):
    layer = _mask_layer(temperature=temperature)

    @tf.function
    def both(seed, batch_size):
        return _old_sample_mask(layer, batch_size, seed), layer.sample_mask(batch_size, seed)

    for words in SEEDS:
        for batch_size in (1, 32):
            old, new = both(_seed(words), tf.constant(batch_size))
            np.testing.assert_array_equal(new.numpy(), old.numpy(), err_msg=str(words))
    # Eagerly, and with an int64 seed as a SeedGenerator gives.
    seed = tf.constant([2**33 + 5, -17], tf.int64)
    np.testing.assert_array_equal(layer.sample_mask(4, seed).numpy(), _old_sample_mask(layer, 4, seed).numpy())


def test_layer_seeds_and_step_seeds_are_unchanged():
    layer = keras.layers.Dense(2, name="conv2_mask")
    for words in SEEDS[:10]:
        scope = Scope(_seed(words), None, False)
        key = zlib.crc32(b"conv2_mask") % (2**31 - 1)
        np.testing.assert_array_equal(
            scope.layer_seed(layer).numpy(),
            tf.random.experimental.stateless_fold_in(_seed(words), key).numpy())
    model = RobustModel(models.lenet5_caffe(), "standard", seed=123)
    model.compile(keras.optimizers.SGD(0.1))
    for step in (0, 1, 12345):
        model.optimizer.iterations.assign(step)
        for stream in (0, 1, 2):
            expected = tf.random.experimental.stateless_fold_in(tf.constant([123, step], tf.int32), stream)
            np.testing.assert_array_equal(model.step_seed(stream).numpy(), expected.numpy())


def _old_random_start(pgd, x, seed):
    """PGD._random_start as it was, on one device, for the uniform starts."""
    example = tf.shape(x)[1:]
    shape = tf.shape(x)
    if pgd.norm == "linf":
        delta = tf.random.stateless_uniform(shape, seed, -pgd.eps, pgd.eps)
    else:
        direction_seed, radius_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        direction = tf.random.stateless_normal(shape, direction_seed)
        direction = direction / _per_example_l2(direction)
        dims = tf.cast(tf.reduce_prod(example), tf.float32)
        u = tf.random.stateless_uniform(tf.concat([shape[:1], tf.ones_like(shape[1:])], 0), radius_seed)
        delta = direction * pgd.eps * tf.pow(u, 1.0 / dims)
    return pgd.project(x + delta, x)


@pytest.fixture(scope="module")
def images():
    return tf.constant(np.random.default_rng(4).uniform(0, 1, size=(16, 12, 12, 1)), tf.float32)


def _logits(x):
    """Some logits: with steps=0 the attack returns its random start, but the loop's body is traced."""
    return tf.reshape(x, [tf.shape(x)[0], -1])[:, :10]


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("linf", 8 / 255), ("l2", 1.5)])
def test_pgd_random_start_is_unchanged_bit_for_bit(norm, eps, images):
    pgd = attacks.PGD(eps, eps / 4, 0, norm=norm, chunks=1)
    y = tf.zeros([16], tf.int32)

    @tf.function
    def both(seed):
        return _old_random_start(pgd, images, seed), pgd(_logits, images, y, seed)

    for words in SEEDS:
        old, new = both(_seed(words))
        np.testing.assert_array_equal(new.numpy(), old.numpy(), err_msg=str(words))
    assert not np.array_equal(new.numpy(), images.numpy())
    if norm == "linf":  # every pixel moved by at most eps, most of them (those not clipped) by some
        assert np.max(np.abs(new.numpy() - images.numpy())) <= np.float32(eps) + 1e-7


# -- (b) under XLA, the same values ---------------------------------------------------------

def test_helpers_under_xla_give_the_same_values_bit_for_bit():
    def draws(seed):
        return ([seeds.stateless_uniform([5, 7, 3], seed, lo, hi) for lo, hi in RANGES]
                + [seeds.stateless_uniform([], seed), seeds.stateless_uniform([4099], seed, -0.1, 0.2)]
                + [seeds.fold_in(seed, data) for data in (0, 7, 2**31 - 1)]
                + [seeds.split(seed, n) for n in (1, 2, 5)])

    both = _with_and_without_xla(draws)
    for words in SEEDS:
        graph, xla = both(_seed(words))
        for g, x in zip(graph, xla):
            np.testing.assert_array_equal(x, g, err_msg=str(words))


def test_tensorflow_itself_differs_under_xla():
    """The control: the calls the helpers replace give other numbers under XLA (the two
    findings of tests/test_xla_and_sync_bn.py), so the test above has something to show."""
    def draws(seed):
        return (_old_uniform([64], seed, -0.3, 0.3), tf.random.experimental.stateless_fold_in(seed, 7))

    both = _with_and_without_xla(draws)
    (uniform, _), (uniform_xla, _) = both(_seed([7, 3]))
    assert not np.array_equal(uniform_xla, uniform)
    (_, folded), (_, folded_xla) = both(_seed([-409271666, 1]))
    assert not np.array_equal(folded_xla, folded)


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("linf", 8 / 255)])
def test_pgd_uniform_random_start_under_xla_is_the_same_to_one_ulp(norm, eps, images):
    """The draw is the same to the bit (test above); x + delta and the projection onto the
    eps-ball are rounded by XLA's fused arithmetic, at most one float32 ulp of a pixel in [0, 1]."""
    pgd = attacks.PGD(eps, eps / 4, 0, norm=norm)
    y = tf.zeros([16], tf.int32)
    both = _with_and_without_xla(lambda seed: pgd(_logits, images, y, seed))
    for words in SEEDS[:12]:
        graph, xla = both(_seed(words))
        np.testing.assert_allclose(xla, graph, rtol=0, atol=2**-23, err_msg=str(words))
        assert not np.array_equal(graph, images.numpy())  # a start was drawn


def test_pgd_l2_random_start_under_xla_differs_only_by_its_gaussian_direction(images):
    """The L2 start's radius is a helper draw, its direction a Gaussian one, which XLA
    still draws otherwise (see seeds.stateless_uniform): the per-example norms agree."""
    pgd = attacks.PGD(1.5, 0.3, 0, norm="l2", clip_min=-10.0, clip_max=10.0)  # no clipping: the norm is the radius
    y = tf.zeros([16], tf.int32)
    graph, xla = _with_and_without_xla(lambda seed: pgd(_logits, images, y, seed) - images)(_seed([-5, 8]))
    np.testing.assert_allclose(np.linalg.norm(xla.reshape(16, -1), axis=1),
                               np.linalg.norm(graph.reshape(16, -1), axis=1), rtol=1e-5)
    # If this fails, XLA draws TensorFlow's Gaussian numbers: reproduce them in `distribute` too.
    assert not np.allclose(xla, graph, atol=1e-3)


def test_mask_sample_under_xla_is_the_same_to_float_rounding():
    layer = _mask_layer()
    both = _with_and_without_xla(lambda seed: layer.sample_mask(32, seed))
    for words in SEEDS[:12]:
        graph, xla = both(_seed(words))
        # The mask is sigmoid((logit(pi) + logistic noise) / t) with t = 0.1 and pi a
        # Kumaraswamy pow of the noise: a rounding difference in XLA's log or pow is
        # multiplied by up to m(1 - m) / t, so a rare element differs by ~1e-3.
        close = np.isclose(xla, graph, rtol=1e-5, atol=1e-6)
        assert close.mean() > 0.995, (words, close.mean())
        np.testing.assert_allclose(xla, graph, rtol=0, atol=1e-2, err_msg=str(words))
        assert 0.05 < np.mean(graph > 0.5) < 0.95  # near-binary draws of both kinds
