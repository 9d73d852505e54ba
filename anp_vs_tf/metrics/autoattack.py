"""Robust accuracy under AutoAttack, stage by stage, with the checks its authors flag.

`autoattack_evaluation` runs an `attacks.AutoAttack` over the first examples of a data
set, one compiled call per batch, and returns what metrics.json holds under `aa_acc`,
`aa_attack` (version, norm, eps, examples, the robust accuracy after each attack) and
`sanity["autoattack"]`: the checks of the reference's autoattack/checks.py that say an
evaluation may be unreliable:

    zero_gradient_examples   clean examples whose input gradient is exactly zero: the
                             gradient attacks cannot move them
    logits_random            two calls on the same images differ: a stochastic network,
                             to be attacked with version="rand"
    square_extra_pct         accuracy points Square took after the gradient attacks
                             (flagged above 0.2, the reference's alpha): gradients that
                             point the wrong way

It takes a `RobustModel` (attacked as `RobustModel.attack` attacks: the deterministic
network, folded, or the sampled one for version="rand") or any logits function, such as
the serving signature of an exported SavedModel, so what is deployed is what is measured.
"""

import keras
import tensorflow as tf

from anp_vs_tf import seeds
from anp_vs_tf.losses import cross_entropy

SQUARE_ALPHA = 0.002  # the reference's check_square_sr: more than 0.2% found by Square alone
RANDOM_LOGITS_TOL = 1e-4  # the reference's check_randomized: normalized logits differ by more


class _Staged:
    """An AutoAttack whose call returns (x_adv, robust per stage), for `RobustModel.attack`."""

    def __init__(self, autoattack):
        self.autoattack = autoattack
        self.eot_samples = autoattack.eot_samples

    def __call__(self, logits_fn, x, y, seed):
        x_adv, robust = self.autoattack.stages(logits_fn, x, y, seed)
        return x_adv, robust, _sanity_counts(logits_fn, x, y)


def _sanity_counts(logits_fn, x, y):
    """[examples with a zero input gradient, 1 if two calls of logits_fn differ]."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        first = logits_fn(x)
        total = tf.reduce_sum(cross_entropy(y, first))
    grad = tape.gradient(total, x)
    zero = tf.reduce_sum(tf.cast(tf.reduce_all(tf.equal(tf.reshape(grad, [tf.shape(x)[0], -1]), 0.0), axis=1),
                                 tf.int32))

    def normalized(logits):
        logits = tf.cast(logits, tf.float32)
        return logits / (tf.norm(logits, axis=1, keepdims=True) + 1e-10)

    second = logits_fn(x)
    differ = tf.reduce_max(tf.norm(normalized(first) - normalized(second), axis=1)) > RANDOM_LOGITS_TOL
    differ = tf.logical_or(differ, tf.reduce_any(tf.not_equal(tf.argmax(first, 1), tf.argmax(second, 1))))
    return tf.stack([zero, tf.cast(differ, tf.int32)])


def _first_examples(dataset, examples, batch_size):
    data = dataset.unbatch()
    if examples is not None:
        data = data.take(examples)
    return data.batch(batch_size)


def autoattack_evaluation(model, dataset, autoattack, examples=None, batch_size=500, seed=0, verbose=1):
    """AutoAttack's robust accuracy on the first `examples` of `dataset` (all if None).

    Args:
        model: a `RobustModel`, or a function from a batch of images to logits.
        dataset: batches of (image, label), e.g. the test split.
        autoattack: an `attacks.AutoAttack`.
        examples: how many of the first examples to attack.
        batch_size: examples per compiled call.
        seed: the attacks' stateless seed (batch b uses its fold-in with b).
        verbose: 1 shows a progress bar with the running robust accuracy.
    Returns:
        {"aa_acc", "aa_attack": {...}, "sanity": {...}} (see the module docstring).
    """
    staged = _Staged(autoattack)

    def one_batch(x, y, s):
        if hasattr(model, "attack"):  # a RobustModel: its own choice of logits and kernels
            _, robust, sanity = model.attack(x, y, adversary=staged, seed=s)
        else:
            _, robust, sanity = staged(model, x, y, s)
        return tf.reduce_sum(tf.cast(robust, tf.int32), axis=1), sanity

    # One graph per batch shape (the last batch may be smaller). Not XLA: the stages
    # attack a batch whose size is known only at run time. The attacks' loops are
    # tf.while_loop and tf.cond already, so AutoGraph has nothing to convert.
    one_batch = tf.function(one_batch, reduce_retracing=True, jit_compile=False, autograph=False)
    data = _first_examples(dataset, examples, batch_size)
    names = ["clean"] + autoattack.names
    survivors = [0] * len(names)
    zero_gradient = random_logits = total = 0
    progress = keras.utils.Progbar(examples, stateful_metrics=["aa_acc"], verbose=verbose) if verbose else None
    base_seed = tf.constant([seed, 0], tf.int32)
    for b, (x, y) in enumerate(data):
        # One read per batch: a batch of AutoAttack is seconds to minutes of compiled work.
        counts, sanity = one_batch(tf.cast(x, tf.float32), y, seeds.fold_in(base_seed, b))
        counts, sanity = counts.numpy(), sanity.numpy()
        survivors = [s + int(c) for s, c in zip(survivors, counts)]
        zero_gradient += int(sanity[0])
        random_logits = random_logits or bool(sanity[1])
        total += int(x.shape[0])
        if progress is not None:
            progress.update(total, [("aa_acc", survivors[-1] / total)])
    if not total:
        raise ValueError("autoattack_evaluation got an empty data set; pass the test split.")
    after = {name: count / total for name, count in zip(names, survivors)}
    gradient_attacks = [name for name in autoattack.names if name != "square"]
    # As the reference's check_square_sr: only when Square follows a gradient attack.
    square_extra = after[gradient_attacks[-1]] - after["square"] if "square" in after and gradient_attacks else 0.0
    checks = {
        "zero_gradient_examples": zero_gradient,
        "logits_random": random_logits,
        "square_extra_pct": 100.0 * square_extra,
        "examples": total,
    }
    checks["passed"] = (zero_gradient == 0 and not (random_logits and autoattack.version == "standard")
                        and square_extra <= SQUARE_ALPHA)
    return {
        "aa_acc": after[names[-1]],
        "aa_attack": {"name": "AutoAttack", **autoattack.get_config(), "attacks": autoattack.names,
                      "examples": total, "robust_acc_after": after},
        "sanity": checks,
    }
