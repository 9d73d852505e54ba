"""Projected gradient descent (Madry et al., 2018), compiled: one `tf.while_loop` per attack.

An attack is a callable `attack(logits_fn, x, y, seed) -> x_adv` with its settings
bound at construction, so training, evaluation and the benchmarks share one object.
`logits_fn` maps a batch of images to logits; `seed` is a stateless seed (a shape-[2]
int32 tensor) for the random start, so a run is reproducible step by step.
"""

import keras
import tensorflow as tf

from anp_vs_tf import kernels, seeds
from anp_vs_tf.losses import cross_entropy
from anp_vs_tf.distribute import replica_rows

NORMS = ("linf", "l2")


def _per_example_l2(v):
    axes = list(range(1, len(v.shape)))
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=axes, keepdims=True) + 1e-12)


def project_to_ball(x_adv, x, eps, norm, clip_min, clip_max):
    """The closest point to x_adv inside the eps-ball (linf or l2) around x, then clipped
    to the valid range: the projection every attack of the package steps back with."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        delta = delta * tf.minimum(1.0, eps / _per_example_l2(delta))
    return tf.clip_by_value(x + delta, clip_min, clip_max)


def unless_empty(x, attack, nothing):
    """`attack()` on a batch that may be empty, `nothing()` when it is: the model never
    sees an empty batch (a convolution on zero rows fails on some devices), whether the
    batch size is known when tracing or only at run time."""
    if x.shape[0] == 0:
        return nothing()
    if x.shape[0] is None:
        return tf.cond(tf.shape(x)[0] > 0, attack, nothing)
    return attack()


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class PGD:
    """L-infinity or L2 PGD with random start and per-example worst case over restarts.

    Args:
        eps: radius of the perturbation ball.
        step_size: length of one ascent step (sign step for linf, unit-L2 step for l2).
        steps: number of ascent steps; 0 gives the random start (or x itself).
        norm: "linf" or "l2".
        random_start: True starts from a uniform point of the ball, False from x, and
            a float from x plus Gaussian noise of that standard deviation (TRADES
            starts 0.001 away from x, where its KL objective has a nonzero gradient).
        restarts: independent runs; each example keeps the run with the highest loss.
        clip_min, clip_max: the valid input range, enforced after every step.
        loss_fn: `loss_fn(y, logits) -> per-example loss` to maximize; cross-entropy
            with integer labels by default. y is split with the images (see chunks), so
            per-example targets come in y, not in a closure: TRADES passes its clean
            predictions as y to a KL.
        eot_samples: expectation over transformation: average the gradient over this
            many calls of `logits_fn`, for a stochastic network (e.g. sampled masks).
        chunks: the batch is attacked as this many slices, each its own loop, which a
            compiled graph runs concurrently. Every example's attack is independent of
            the others, so the result is the same to float rounding. "auto" (default)
            takes the number `kernels.choose()` has for the device when the attack is
            traced: 2 on the 2-core AVX2 CPU where it was measured (one batch's ops left
            a core idle; PGD-20 on LeNet-5 ~20% faster), 1 elsewhere (other CPUs, GPUs,
            TPUs, XLA).
            A batch smaller than `chunks` is attacked whole, and an empty batch comes
            back as it is: no chunk is ever empty (oneDNN's MaxPoolGrad aborts the
            process on an empty batch in TensorFlow 2.21).
    """

    def __init__(
        self,
        eps,
        step_size,
        steps,
        norm="linf",
        random_start=True,
        restarts=1,
        clip_min=0.0,
        clip_max=1.0,
        loss_fn=None,
        eot_samples=1,
        chunks="auto",
    ):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}.")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {restarts}.")
        if int(eot_samples) != eot_samples or eot_samples < 1:
            raise ValueError(f"eot_samples must be a positive integer, got {eot_samples}.")
        if chunks != "auto" and (isinstance(chunks, str) or int(chunks) != chunks or chunks < 1):
            raise ValueError(f'chunks must be "auto" or a positive integer, got {chunks!r}.')
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be below clip_max, got {clip_min}, {clip_max}.")
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.norm = norm
        if isinstance(random_start, bool):
            self.random_start = random_start
        elif random_start > 0:
            self.random_start = float(random_start)
        else:
            raise ValueError(f"random_start must be True, False or a positive std, got {random_start}.")
        self.restarts = int(restarts)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.loss_fn = loss_fn or cross_entropy
        self.eot_samples = int(eot_samples)
        self.chunks = chunks if chunks == "auto" else int(chunks)

    def __repr__(self):
        return (
            f"PGD(eps={self.eps}, step_size={self.step_size}, steps={self.steps}, "
            f"norm={self.norm!r}, restarts={self.restarts}, eot_samples={self.eot_samples}, "
            f"chunks={self.chunks!r})"
        )

    # -- geometry of the ball ----------------------------------------------------

    def project(self, x_adv, x):
        """The closest point to x_adv inside the eps-ball around x and the valid range."""
        return project_to_ball(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)

    def _random_start(self, x, seed):
        # Each example's start is its row of a draw for the global batch, whatever the
        # number of replicas (see distribute.replica_rows). Uniform draws and seeds come
        # from `seeds`, so they are the same under XLA; Gaussian ones are not.
        rows, example = tf.shape(x)[0], tf.shape(x)[1:]

        def draw(sample):
            return replica_rows(lambda n: sample(tf.concat([[n], example], 0)), rows)

        if not isinstance(self.random_start, bool):  # Gaussian start, as TRADES
            noise = draw(lambda shape: tf.random.stateless_normal(shape, seed, stddev=self.random_start))
            return self.project(x + tf.cast(noise, x.dtype), x)
        if self.norm == "linf":
            delta = draw(lambda shape: seeds.stateless_uniform(shape, seed, -self.eps, self.eps))
        else:
            # Uniform in the L2 ball: a uniform direction times radius eps * u^(1/d).
            direction_seed, radius_seed = tf.unstack(seeds.split(seed, 2))
            direction = draw(lambda shape: tf.random.stateless_normal(shape, direction_seed))
            direction = direction / _per_example_l2(direction)
            dims = tf.cast(tf.reduce_prod(example), tf.float32)
            u = draw(lambda shape: seeds.stateless_uniform(
                tf.concat([shape[:1], tf.ones_like(shape[1:])], 0), radius_seed))
            delta = direction * self.eps * tf.pow(u, 1.0 / dims)
        return self.project(x + tf.cast(delta, x.dtype), x)

    def _ascent_direction(self, grad):
        if self.norm == "linf":
            return tf.sign(grad)
        return grad / _per_example_l2(grad)

    # -- the attack ----------------------------------------------------------------

    def _gradient(self, logits_fn, x_adv, y):
        """The loss gradient with respect to x_adv.

        Where the kernel choice has `own_gradient_function` (a CPU it was measured on),
        it is traced as its own function, which TensorFlow does not inline into the
        loop. On an AVX2 CPU, within a `tf.while_loop` body, oneDNN's graph rewrite of
        MaxPoolGrad (it needs the forward MaxPool already rewritten) succeeded or not
        from one trace to the next; without it the gradient ran TensorFlow's generic
        kernel, ~20x slower: ~0.34 s of a ~2.9 s VGG-16 AT step. In a function of its
        own the rewrite was made in every trace.
        """
        if not tf.inside_function() or not kernels.choose().own_gradient_function:
            return self._tape_gradient(logits_fn, x_adv, y)
        own_function = tf.function(lambda x_adv, y: self._tape_gradient(logits_fn, x_adv, y),
                                   experimental_attributes={"_noinline": True})
        return own_function(x_adv, y)

    def _tape_gradient(self, logits_fn, x_adv, y):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            total = tf.reduce_sum(self.loss_fn(y, logits_fn(x_adv)))
        return tape.gradient(total, x_adv)

    def _expected_gradient(self, logits_fn, x_adv, y):
        """The loss gradient, averaged over `eot_samples` draws of a stochastic logits_fn."""
        if self.eot_samples == 1:
            return self._gradient(logits_fn, x_adv, y)

        def body(k, total):
            return k + 1, total + self._gradient(logits_fn, x_adv, y)

        _, total = tf.while_loop(
            lambda k, _: k < self.eot_samples, body, (tf.constant(0), tf.zeros_like(x_adv)),
            maximum_iterations=self.eot_samples,
        )
        return total / self.eot_samples

    def _single_run(self, logits_fn, x, y, seed):
        # The random start is drawn for the whole batch, so chunking does not change it.
        x_adv = self._random_start(x, seed) if self.random_start is not False else tf.identity(x)

        def ascend(x_adv, x, y):
            def body(i, x_adv):
                grad = self._expected_gradient(logits_fn, x_adv, y)
                x_next = x_adv + self.step_size * self._ascent_direction(grad)
                return i + 1, tf.stop_gradient(self.project(x_next, x))

            _, x_adv = tf.while_loop(
                lambda i, _: i < self.steps, body, (tf.constant(0), x_adv),
                maximum_iterations=self.steps,
            )
            return x_adv

        chunks = kernels.choose().attack_chunks if self.chunks == "auto" else self.chunks
        if x.shape[0] is not None:
            chunks = min(chunks, x.shape[0])
        if chunks == 1 or self.steps == 0:
            return ascend(x_adv, x, y)

        def chunked():
            rows = tf.shape(x)[0]
            bounds = [rows * c // chunks for c in range(chunks + 1)]
            return tf.concat([
                ascend(*tf.nest.map_structure(lambda t: t[start:stop], (x_adv, x, y)))
                for start, stop in zip(bounds, bounds[1:])
            ], axis=0)

        if x.shape[0] is not None:
            return chunked()
        return tf.cond(tf.shape(x)[0] >= chunks, chunked, lambda: ascend(x_adv, x, y))

    def __call__(self, logits_fn, x, y, seed=None):
        """Adversarial examples for (x, y); `seed` is a stateless seed for the random start."""
        x, seed = tf.convert_to_tensor(x), seeds.attack_seed(seed)
        return unless_empty(x, lambda: self._attack(logits_fn, x, y, seed), lambda: tf.identity(x))

    def _attack(self, logits_fn, x, y, seed):
        if self.restarts == 1:
            return self._single_run(logits_fn, x, y, seed)
        restart_seeds = seeds.split(seed, self.restarts)
        best = self._single_run(logits_fn, x, y, restart_seeds[0])
        best_loss = self.loss_fn(y, logits_fn(best))
        for r in range(1, self.restarts):  # a handful of restarts, each a compiled loop
            candidate = self._single_run(logits_fn, x, y, restart_seeds[r])
            loss = self.loss_fn(y, logits_fn(candidate))
            better = tf.reshape(loss > best_loss, [-1] + [1] * (len(x.shape) - 1))
            best = tf.where(better, candidate, best)
            best_loss = tf.maximum(loss, best_loss)
        return best

    def _settings(self):
        return dict(
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            restarts=self.restarts,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            eot_samples=self.eot_samples,
            chunks=self.chunks,
        )

    def replace(self, **changes):
        """A copy with some settings changed, e.g. `pgd.replace(eps=1.0, steps=80)`."""
        return PGD(**{**self._settings(), "loss_fn": self.loss_fn, **changes})

    def get_config(self):
        if self.loss_fn is not cross_entropy:
            raise ValueError("a PGD with a custom loss_fn is not serializable; rebuild it in code.")
        return self._settings()

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def fgsm(eps, clip_min=0.0, clip_max=1.0, **settings):
    """FGSM (Goodfellow et al., 2015): one gradient step of size eps from x, no random
    start, no restarts (signed for L-infinity, normalized for L2). `settings` are PGD's
    other arguments (norm, loss_fn, eot_samples, chunks)."""
    return PGD(eps, eps, 1, clip_min=clip_min, clip_max=clip_max,
               **{**settings, "random_start": False, "restarts": 1})
