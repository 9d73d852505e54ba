"""How the package's stochastic layers draw their randomness within one step.

Beta-Bernoulli masks and Gaussian weights are random. A trainer that wants its steps
to be reproducible and resumable, and the clean and adversarial views of a batch to
share one draw, says so with the `sampling` scope; layers read it while a
`tf.function` is traced, so it costs nothing per step.
"""

import contextlib
import threading
import zlib

import tensorflow as tf

from anp_vs_tf import seeds


class Scope:
    """The settings of one `sampling` block, and the masks it shares."""

    def __init__(self, seed, shared_batch_size, at_inference):
        self.seed = seed
        self.shared_batch_size = shared_batch_size
        self.at_inference = at_inference
        self.shared = {}

    def layer_seed(self, layer):
        """This layer's stateless seed: the step's seed with the layer's name folded in
        (`seeds.fold_in`, so the same under XLA)."""
        if self.seed is None:
            return None
        key = zlib.crc32(layer.name.encode()) % (2**31 - 1)
        return seeds.fold_in(tf.cast(self.seed, tf.int32), key)


_state = threading.local()


def current_scope():
    """The innermost active `sampling` scope, or None."""
    return getattr(_state, "scope", None)


@contextlib.contextmanager
def sampling(seed=None, shared_batch_size=None, at_inference=False):
    """Control how `BetaBernoulliDropout` and the Gaussian layers draw inside this block.

    seed: a stateless seed (shape-[2] int tensor) for this step. Each layer folds in
        its own name, so its draw is a pure function of (seed, layer): a trainer that
        keys the seed by its step counter can be stopped and resumed exactly. Without
        it, layers use their own `keras.random.SeedGenerator`.
    shared_batch_size: if given, each mask layer samples one mask for that many
        examples and reuses it for every view of them: a stacked batch such as
        `tf.concat([x, x_adv], 0)` (the mask is tiled) or separate calls on `x` and
        `x_adv`. Vulnerability |z - z~| then measures what the perturbation does to a
        feature, not the difference between two dropout draws.
    at_inference: sample masks even in inference mode (training=False), so that batch
        norm keeps its moving statistics while the masks are random: the stochastic
        network an expectation-over-transformation attack averages over.
    """
    previous = current_scope()
    _state.scope = Scope(seed, shared_batch_size, at_inference)
    try:
        yield _state.scope
    finally:
        _state.scope = previous
