"""The paper's qualitative analyses of a trained model, as compiled TensorFlow computations.

    loss_surface            the loss around one input along an adversarial and a random
                            direction: smooth and rising along the attack means the
                            robustness is not gradient obfuscation.
    vulnerability_saliency  d V(x, x~) / d x per example: which pixels drive the
                            distortion of the latent features.
    first_layer_feature_vulnerability
                            per-feature vulnerability of the first latent layer, the
                            input of the paper's vulnerability histograms.

Every function runs the deterministic (inference) network and evaluates whole grids or
batches in one `tf.function` call, compiled once per model (and traced once per attack).
"""

import functools
import weakref

import numpy as np
import tensorflow as tf

from anp_vs_tf import seeds
from anp_vs_tf.losses import cross_entropy
from anp_vs_tf.metrics.vulnerability import example_vulnerability, feature_vulnerability

DEFAULT_RADIUS = 0.3  # the L-infinity budget of the paper's MNIST attacks


def _compiled_per_model(fn):
    """`fn(model, *args)` as one `tf.function` per model.

    A model is a Python argument, so a single tf.function would trace once per model
    anyway; keeping one per model says so, lets it die with its model, and keeps
    TensorFlow from warning about "excessive retracing" in a report over many models.
    """
    per_model = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        if model not in per_model:
            # A partial, not a lambda: TensorFlow counts traces per code object, which
            # every model's lambda would share. The weak reference keeps the model's
            # entry collectable.
            bound = functools.partial(_call_with_model, fn, weakref.ref(model))
            per_model[model] = tf.function(bound, reduce_retracing=True)
        return per_model[model](*args, **kwargs)

    return call


def _call_with_model(fn, model_ref, *args, **kwargs):
    return fn(model_ref(), *args, **kwargs)


def _stateless_seed(seed, stream):
    return tf.constant([int(seed) % (2**31 - 1), stream], tf.int32)


@_compiled_per_model
def adversarial_examples(model, x, y, adversary, seed):
    """`model.attack` with `adversary`, compiled; `seed` is a stateless seed (shape [2])."""
    return model.attack(x, y, adversary, seed=seed)


def attack_batch(model, x, y, adversary, seed=0):
    """x~ for one batch as a numpy array, reproducible by `seed`."""
    x_adv = adversarial_examples(
        model, tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32),
        adversary, _stateless_seed(seed, 1),
    )
    return x_adv.numpy()


# -- loss surface ------------------------------------------------------------------


@_compiled_per_model
def _gradient_sign(model, x, y):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(cross_entropy(y, model.inference_logits(x)))
    return tf.sign(tape.gradient(loss, x))


@_compiled_per_model
def _surface_losses(model, x, y, d_adv, d_rand, coefficients, chunk):
    """Cross-entropy at clip(x + a d_adv + b d_rand) for every (a, b) row of `coefficients`.

    `coefficients` has a multiple of `chunk` rows; `tf.map_fn` evaluates one chunk of
    images per iteration, so memory stays bounded on a fine grid.
    """

    def chunk_losses(ab):
        images = x + ab[:, 0, None, None, None] * d_adv + ab[:, 1, None, None, None] * d_rand
        images = tf.clip_by_value(images, 0.0, 1.0)
        labels = tf.fill(tf.shape(ab)[:1], y[0])
        return cross_entropy(labels, model.inference_logits(images))

    chunks = tf.reshape(coefficients, [-1, chunk, 2])
    return tf.reshape(tf.map_fn(chunk_losses, chunks, fn_output_signature=tf.float32), [-1])


def loss_surface(model, x, y, adversary=None, radius=None, resolution=21, seed=0, batch_size=512):
    """The loss landscape around one input (Madaan et al., 2020, the obfuscation check).

    Directions, both with entries in {-1, 0, 1} so that alpha is an L-infinity length:
        d_adv  = sign(d CE / d x) at x, or, with `adversary`, sign(x~ - x) for its x~;
        d_rand = a Rademacher (+-1) direction drawn from `seed`.

    Args:
        model: a `RobustModel`; its deterministic network is evaluated.
        x: one image (H, W, C) in [0, 1]; y: its integer label.
        adversary: optional attack (e.g. `attacks.PGD`) whose perturbation gives d_adv.
        radius: half-width of the grid; defaults to `adversary.eps` (meaningful for an
            L-infinity attack; pass it for an L2 one), else DEFAULT_RADIUS (0.3).
        resolution: points per axis; an odd number puts a grid point at x itself.
        seed: seed of the random direction and of the attack's random start.
        batch_size: images per forward pass while evaluating the grid.
    Returns:
        dict of numpy arrays: alphas (R,), betas (R,), losses (R, R) with losses[i, j]
        the cross-entropy at clip(x + alphas[i] d_adv + betas[j] d_rand, 0, 1).
    """
    if radius is None:
        radius = adversary.eps if adversary is not None else DEFAULT_RADIUS
    x = tf.convert_to_tensor(np.asarray(x, np.float32)[None])
    y = tf.constant([int(y)], tf.int32)
    if adversary is None:
        d_adv = _gradient_sign(model, x, y)
    else:
        d_adv = tf.sign(adversarial_examples(model, x, y, adversary, _stateless_seed(seed, 1)) - x)
    d_rand = 2.0 * tf.cast(
        tf.random.stateless_uniform(tf.shape(x), _stateless_seed(seed, 2), 0, 2, tf.int32), tf.float32
    ) - 1.0

    alphas = np.linspace(-radius, radius, resolution, dtype=np.float32)
    betas = alphas.copy()
    grid = np.stack(np.meshgrid(alphas, betas, indexing="ij"), -1).reshape(-1, 2)
    chunk = min(len(grid), batch_size)
    padded = np.concatenate([grid, np.zeros((-len(grid) % chunk, 2), np.float32)])
    losses = _surface_losses(model, x, y, d_adv, d_rand, tf.constant(padded), chunk)
    return {
        "alphas": alphas,
        "betas": betas,
        "losses": losses.numpy()[: len(grid)].reshape(resolution, resolution),
    }


# -- saliency of the vulnerability ---------------------------------------------------


@_compiled_per_model
def _vulnerability_gradient(model, x, x_adv):
    _, latents_adv = model.logits_and_latents(x_adv, training=False)
    with tf.GradientTape() as tape:
        tape.watch(x)
        _, latents = model.logits_and_latents(x, training=False)
        # Examples do not interact at inference, so the gradient of the sum is, per
        # example, the gradient of that example's V_i.
        total = tf.reduce_sum(example_vulnerability(latents, latents_adv))
    return tape.gradient(total, x)


def vulnerability_saliency(model, x, x_adv):
    """Per-pixel saliency of each example's network vulnerability V_i = V(x_i, x~_i).

    The gradient of V_i with respect to the clean x_i (x~_i held fixed), summed in
    absolute value over channels and scaled to [0, 1] by each map's maximum. At
    x~ = x every |z - z~| sits at its kink, where TensorFlow's subgradient of |.| is
    0, so the map is all zeros (a zero map stays zero rather than dividing by 0).

    Args:
        x, x_adv: batches (N, H, W, C) of clean and adversarial images.
    Returns:
        numpy array (N, H, W) in [0, 1].
    """
    grad = _vulnerability_gradient(
        model, tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(x_adv, tf.float32)
    )
    saliency = tf.reduce_sum(tf.abs(grad), axis=-1)
    peak = tf.reduce_max(saliency, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(saliency, peak).numpy()


# -- per-feature vulnerability ----------------------------------------------------------


@_compiled_per_model
def _first_layer_sum(model, x, y, adversary, seed):
    x_adv = model.attack(x, y, adversary, seed=seed)
    z = model.logits_and_latents(x, training=False)[1][0]
    z_adv = model.logits_and_latents(x_adv, training=False)[1][0]
    return feature_vulnerability(z, z_adv) * tf.cast(tf.shape(x)[0], tf.float32)


def first_layer_feature_vulnerability(model, dataset, adversary, seed=0):
    """Per-feature vulnerability (units,) of the first latent layer over `dataset`.

    The same quantity the evaluation accumulates for metrics.json, for one layer:
    weighted by examples, so it does not depend on the batching. Iterates the whole
    of `dataset`; pass a list with one batch to get a quick estimate.
    """
    total, count = None, 0
    for step, (x, y) in enumerate(dataset):
        x = tf.convert_to_tensor(x, tf.float32)
        batch_sum = _first_layer_sum(
            model, x, tf.convert_to_tensor(y, tf.int32), adversary,
            seeds.fold_in(_stateless_seed(seed, 3), step),
        ).numpy()
        total = batch_sum if total is None else total + batch_sum
        count += int(x.shape[0])
    if total is None:
        raise ValueError("dataset is empty.")
    return total / count
