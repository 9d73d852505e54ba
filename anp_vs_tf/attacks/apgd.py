"""Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1), compiled: one `tf.while_loop` per run.

APGD is PGD without a step size to tune: it starts at 2 * eps, adds momentum, and at
checkpoints halves the step (and goes back to the best point so far) for the examples
whose loss stalled. It keeps, per example, the highest-loss point and any misclassified
point it passes through. APGD-T (`targeted=True`) runs it once per target class, the
`target_classes` highest non-true clean logits, on the targeted loss.

The same contract as `PGD`: `attack(logits_fn, x, y, seed) -> x_adv`, settings bound at
construction, stateless seeds, L-infinity or L2, channel-last, any (even empty or
dynamic) batch. The reference is the authors' PyTorch code, fra31/auto-attack,
autoattack/autopgd_base.py; where it and the paper differ, the docstring of `APGD` says
which one this follows.
"""

import fractions
import math

import keras
import tensorflow as tf

from anp_vs_tf import kernels, seeds
from anp_vs_tf.attacks.pgd import NORMS, _per_example_l2, project_to_ball, unless_empty
from anp_vs_tf.distribute import replica_rows
from anp_vs_tf.losses import cross_entropy

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75  # alpha of the paper; the first step has none


# -- the difference of logits ratio ---------------------------------------------------


def _sorted_logits(logits, k, name):
    classes = logits.shape[-1]
    if classes is not None and classes < k:
        raise ValueError(f"the {name} loss needs at least {k} classes, got logits with {classes}.")
    return tf.math.top_k(logits, k=k, sorted=True).values


def dlr_loss(labels, logits):
    """Per-example difference of logits ratio (Croce & Hein, 2020, eq. 5), shape [batch]:

        DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)

    with z_pi1 >= z_pi2 >= ... the sorted logits. Invariant to shifting and scaling the
    logits; positive exactly where the example is misclassified. Needs 3 classes.
    Same argument order as `losses.cross_entropy`; computed in float32.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    top = _sorted_logits(logits, 3, "DLR")
    true = tf.gather(logits, labels, axis=1, batch_dims=1)
    is_true = tf.one_hot(labels, tf.shape(logits)[1], on_value=True, off_value=False)
    best_other = tf.reduce_max(tf.where(is_true, tf.constant(-float("inf")), logits), axis=1)
    return -(true - best_other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(labels, logits, targets):
    """Per-example targeted DLR (Croce & Hein, 2020, eq. 6), shape [batch]:

        DLR_t(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

    for target classes `targets` (integer, one per example). Needs 4 classes.
    """
    logits = tf.cast(logits, tf.float32)
    top = _sorted_logits(logits, 4, "targeted DLR")
    true = tf.gather(logits, tf.cast(labels, tf.int32), axis=1, batch_dims=1)
    target = tf.gather(logits, tf.cast(targets, tf.int32), axis=1, batch_dims=1)
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


# -- the checkpoints ------------------------------------------------------------------


def checkpoints(steps):
    """The steps (counted from 1) after which APGD may halve its step size.

    The paper's w_j = ceil(p_j * steps) for p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) up to p_j <= 1, in exact fractions
    (0.22 * 100 is 22.000000000000004 in floating point), a repeated w_j counted once.
    For 100 steps (AutoAttack's) these are 22, 41, 57, 70, 80, 87, 93, 99, as in the
    reference and in ART. The reference counts its periods in whole steps instead
    (int(0.22 * steps), then each int(0.03 * steps) shorter, not below int(0.06 *
    steps), all at least one step): the same for any multiple of 100 steps, but more
    checkpoints for fewer steps (for 20: 4, 7, 9, 10, 11, ..., 20 against 5, 9, 12, 14,
    16, 18, 19, 20 here).
    """
    fraction = fractions.Fraction
    previous, p = fraction(0), fraction(22, 100)
    points = []
    while p <= 1:
        point = max(math.ceil(p * steps), 1)
        if not points or point > points[-1]:
            points.append(point)
        previous, p = p, p + max(p - previous - fraction(3, 100), fraction(6, 100))
    return points


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class APGD:
    """APGD (Croce & Hein, 2020) with the CE or DLR loss, untargeted or targeted (APGD-T).

    Args:
        eps: radius of the perturbation ball.
        steps: iterations per run (N_iter; 100 in AutoAttack).
        norm: "linf" or "l2".
        loss: "ce" (cross-entropy) or "dlr" (difference of logits ratio, `dlr_loss`).
            Targeted, "dlr" is `targeted_dlr_loss` (AutoAttack's APGD-T) and "ce" the
            negative cross-entropy to the target class.
        restarts: runs from independent random starts (per target class if targeted).
        targeted: APGD-T: one run per target class, the `target_classes` non-true
            classes with the highest clean logits, in that order.
        target_classes: how many (9 in AutoAttack; at most the number of classes - 1).
        rho: condition 1 halves the step of an example whose loss rose in at most a
            fraction rho of the steps since the last checkpoint.
        clip_min, clip_max: the valid input range, enforced after every step.
        eot_samples: expectation over transformation: the gradient, the loss the
            checkpoints look at, and the logits that decide misclassification are
            averaged over this many calls of `logits_fn` (AutoAttack's "rand" version
            uses 20 for a stochastic network).

    Returns, per example: the clean image if it is misclassified already, else a
    misclassified point if any step of any run reached one (the last one of the first
    run that did), else the highest-loss point of all runs (for APGD-T, the highest
    on its own run's targeted loss). A run is skipped when every example of the batch
    is misclassified before it.

    The algorithm is the reference's, written anew in TensorFlow: a random start on the
    boundary of the ball (uniform directions for L-inf, scaled to the L-inf norm eps;
    Gaussian ones for L2), an initial step of 2 * eps in both norms (sign steps for
    L-inf, unit-L2 steps for L2), the paper's `checkpoints`; at a checkpoint, an
    example's step is halved and it restarts from its best point (with that point's
    gradient) if (1) its loss rose in at most rho * (steps since the last checkpoint)
    of those steps, or (2) its step was not halved at the last checkpoint and its best
    loss did not improve since then (not at the first checkpoint, as in the reference).
    Where this follows the paper over the reference: the loss increases of condition 1
    are counted against the loss of the current point, which for the first step is the
    starting point's (the reference compares it against an empty slot of its loss
    history, 0) and after a restart is the best loss (the reference compares with the
    point it left).
    """

    def __init__(
        self,
        eps,
        steps=100,
        norm="linf",
        loss="ce",
        restarts=1,
        targeted=False,
        target_classes=9,
        rho=0.75,
        clip_min=0.0,
        clip_max=1.0,
        eot_samples=1,
    ):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {restarts}.")
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be True or False, got {targeted!r}.")
        if isinstance(target_classes, bool) or int(target_classes) != target_classes or target_classes < 1:
            raise ValueError(f"target_classes must be a positive integer, got {target_classes}.")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {rho}.")
        if isinstance(eot_samples, bool) or int(eot_samples) != eot_samples or eot_samples < 1:
            raise ValueError(f"eot_samples must be a positive integer, got {eot_samples}.")
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be below clip_max, got {clip_min}, {clip_max}.")
        self.eps = float(eps)
        self.steps = int(steps)
        self.norm = norm
        self.loss = loss
        self.restarts = int(restarts)
        self.targeted = targeted
        self.target_classes = int(target_classes)
        self.rho = float(rho)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.eot_samples = int(eot_samples)

    def __repr__(self):
        target = f", targeted=True, target_classes={self.target_classes}" if self.targeted else ""
        return (
            f"APGD(eps={self.eps}, steps={self.steps}, norm={self.norm!r}, loss={self.loss!r}, "
            f"restarts={self.restarts}{target}, rho={self.rho}, eot_samples={self.eot_samples})"
        )

    @property
    def runs(self):
        """Runs of the loop per attack: restarts, times the target classes if targeted."""
        return self.restarts * (self.target_classes if self.targeted else 1)

    # -- geometry of the ball ----------------------------------------------------

    def project(self, x_adv, x):
        """The closest point to x_adv inside the eps-ball around x, then clipped to the valid range."""
        return project_to_ball(x_adv, x, self.eps, self.norm, self.clip_min, self.clip_max)

    def _random_start(self, x, seed):
        """A point on the boundary of the ball, clipped to the valid range (as the reference)."""
        rows, example = tf.shape(x)[0], tf.shape(x)[1:]
        shape = lambda n: tf.concat([[n], example], 0)  # noqa: E731
        axes = list(range(1, len(x.shape)))
        if self.norm == "linf":
            t = replica_rows(lambda n: seeds.stateless_uniform(shape(n), seed, -1.0, 1.0), rows)
            t = t / (tf.reduce_max(tf.abs(t), axis=axes, keepdims=True) + 1e-12)
        else:
            t = replica_rows(lambda n: tf.random.stateless_normal(shape(n), seed), rows)
            t = t / (tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes, keepdims=True)) + 1e-12)
        return tf.clip_by_value(x + tf.cast(self.eps * t, x.dtype), self.clip_min, self.clip_max)

    def _ascent_direction(self, grad):
        if self.norm == "linf":
            return tf.sign(grad)
        return grad / _per_example_l2(grad)

    # -- loss and gradient -------------------------------------------------------------

    def _loss(self, y, logits, target):
        if not self.targeted:
            return cross_entropy(y, logits) if self.loss == "ce" else dlr_loss(y, logits)
        if self.loss == "ce":
            return -cross_entropy(target, logits)
        return targeted_dlr_loss(y, logits, target)

    def _tape_evaluation(self, logits_fn, x_adv, y, target):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = tf.cast(logits_fn(x_adv), tf.float32)
            loss = self._loss(y, logits, target)
            total = tf.reduce_sum(loss)
        return loss, logits, tape.gradient(total, x_adv)

    def _evaluation(self, logits_fn, x_adv, y, target):
        """Per-example loss, logits and loss gradient at x_adv (see `PGD._gradient` for
        why the gradient is a non-inlined function where the kernel choice says so)."""
        if not tf.inside_function() or not kernels.choose().own_gradient_function:
            return self._tape_evaluation(logits_fn, x_adv, y, target)
        own_function = tf.function(lambda x_adv, y, target: self._tape_evaluation(logits_fn, x_adv, y, target),
                                   experimental_attributes={"_noinline": True})
        return own_function(x_adv, y, target)

    def _expected_evaluation(self, logits_fn, x_adv, y, target):
        """Loss, logits and gradient, averaged over `eot_samples` calls of logits_fn."""
        if self.eot_samples == 1:
            return self._evaluation(logits_fn, x_adv, y, target)

        def body(k, totals):
            values = self._evaluation(logits_fn, x_adv, y, target)
            return k + 1, tuple(total + value for total, value in zip(totals, values))

        first = self._evaluation(logits_fn, x_adv, y, target)  # shapes and dtypes of the totals
        _, totals = tf.while_loop(
            lambda k, _: k < self.eot_samples, body, (tf.constant(1), first),
            maximum_iterations=self.eot_samples - 1,
        )
        return tuple(total / self.eot_samples for total in totals)

    def _expected_logits(self, logits_fn, x):
        if self.eot_samples == 1:
            return tf.cast(logits_fn(x), tf.float32)
        return tf.add_n([tf.cast(logits_fn(x), tf.float32) for _ in range(self.eot_samples)]) / self.eot_samples

    # -- one run ---------------------------------------------------------------------

    def _run(self, logits_fn, x, y, target, seed, record=False):
        """One run of Algorithm 1 from a random start, as one tf.while_loop.

        Returns a dict: "x_adv" (a misclassified point if one was reached, else the
        best-loss point), "fooled" and "best_loss" per example; with `record`, also
        "loss", "best_loss_trace" and "step_size" of shape [steps + 1, batch] (row 0 at
        the start, row i after step i).
        """
        rank = len(x.shape)
        per_example = lambda v: tf.reshape(v, [-1] + [1] * (rank - 1))  # noqa: E731
        points = checkpoints(self.steps)
        is_checkpoint = tf.constant([i + 1 in points for i in range(self.steps)])
        since_last = {p: p - q for p, q in zip(points, [0] + points)}
        period = tf.constant([float(since_last.get(i + 1, 1)) for i in range(self.steps)])

        x_start = self._random_start(x, seed)
        loss, logits, grad = self._expected_evaluation(logits_fn, x_start, y, target)
        fooled = tf.not_equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.cast(y, tf.int32))
        step_size = 2.0 * self.eps * tf.ones_like(loss)
        state = dict(
            x_cur=x_start, x_prev=x_start, grad=grad, loss=loss,
            x_best=x_start, grad_best=grad, best_loss=loss,
            x_fooled=x_start, fooled=fooled,
            step_size=step_size, increases=tf.zeros_like(loss),
            best_loss_at_check=loss, halved_at_check=tf.ones_like(fooled),
        )
        if record:
            def trace(value):
                return tf.TensorArray(tf.float32, size=self.steps + 1, element_shape=value.shape).write(0, value)

            state.update(trace_loss=trace(loss), trace_best_loss=trace(loss), trace_step_size=trace(step_size))

        def body(i, s):
            s = dict(s)
            momentum = tf.where(tf.equal(i, 0), 1.0, MOMENTUM)
            x_cur = s["x_cur"]
            eta = per_example(tf.cast(s["step_size"], x.dtype))
            z = self.project(x_cur + eta * self._ascent_direction(s["grad"]), x)
            a = tf.cast(momentum, x.dtype)
            x_new = tf.stop_gradient(self.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - s["x_prev"]), x))
            loss, logits, grad = self._expected_evaluation(logits_fn, x_new, y, target)

            fooled_now = tf.not_equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.cast(y, tf.int32))
            s["x_fooled"] = tf.where(per_example(fooled_now), x_new, s["x_fooled"])
            s["fooled"] = s["fooled"] | fooled_now
            s["increases"] += tf.cast(loss > s["loss"], tf.float32)
            better = loss > s["best_loss"]
            s["x_best"] = tf.where(per_example(better), x_new, s["x_best"])
            s["grad_best"] = tf.where(per_example(better), grad, s["grad_best"])
            s["best_loss"] = tf.where(better, loss, s["best_loss"])
            s["x_prev"], s["x_cur"], s["grad"], s["loss"] = x_cur, x_new, grad, loss

            # The checkpoint: every example decides on its own whether to halve its step.
            check = tf.gather(is_checkpoint, i)
            oscillating = s["increases"] <= self.rho * tf.gather(period, i)
            stalled = ~s["halved_at_check"] & (s["best_loss_at_check"] >= s["best_loss"])
            halve = check & (oscillating | stalled)
            s["step_size"] = tf.where(halve, s["step_size"] / 2.0, s["step_size"])
            s["x_cur"] = tf.where(per_example(halve), s["x_best"], s["x_cur"])
            s["grad"] = tf.where(per_example(halve), s["grad_best"], s["grad"])
            s["loss"] = tf.where(halve, s["best_loss"], s["loss"])
            s["halved_at_check"] = tf.where(check, halve, s["halved_at_check"])
            s["best_loss_at_check"] = tf.where(check, s["best_loss"], s["best_loss_at_check"])
            s["increases"] = tf.where(check, tf.zeros_like(s["increases"]), s["increases"])
            if record:
                s["trace_loss"] = s["trace_loss"].write(i + 1, loss)
                s["trace_best_loss"] = s["trace_best_loss"].write(i + 1, s["best_loss"])
                s["trace_step_size"] = s["trace_step_size"].write(i + 1, s["step_size"])
            return i + 1, s

        _, state = tf.while_loop(
            lambda i, _: i < self.steps, body, (tf.constant(0), state), maximum_iterations=self.steps,
        )
        result = dict(
            x_adv=tf.where(per_example(state["fooled"]), state["x_fooled"], state["x_best"]),
            fooled=state["fooled"],
            best_loss=state["best_loss"],
        )
        if record:
            result.update(loss=state["trace_loss"].stack(), best_loss_trace=state["trace_best_loss"].stack(),
                          step_size=state["trace_step_size"].stack())
        return result

    # -- the attack ----------------------------------------------------------------

    def __call__(self, logits_fn, x, y, seed=None):
        """Adversarial examples for (x, y); `seed` is a stateless seed for the random starts."""
        x, seed = tf.convert_to_tensor(x), seeds.attack_seed(seed)
        return unless_empty(x, lambda: self._attack(logits_fn, x, y, seed), lambda: tf.identity(x))

    def _targets(self, y, clean_logits):
        """[batch, target_classes]: the non-true classes by decreasing clean logit."""
        classes = clean_logits.shape[-1]
        if classes is not None and self.target_classes > classes - 1:
            raise ValueError(f"target_classes must be at most the number of classes - 1 ({classes - 1}), "
                             f"got {self.target_classes}.")
        is_true = tf.one_hot(tf.cast(y, tf.int32), tf.shape(clean_logits)[1], on_value=True, off_value=False)
        others = tf.where(is_true, tf.constant(-float("inf")), clean_logits)
        return tf.math.top_k(others, k=self.target_classes).indices

    def _attack(self, logits_fn, x, y, seed):
        y = tf.cast(y, tf.int32)
        clean_logits = self._expected_logits(logits_fn, x)
        targets = self._targets(y, clean_logits) if self.targeted else None
        run_seeds = seeds.split(seed, self.runs) if self.runs > 1 else seed[tf.newaxis]
        per_example = lambda v: tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))  # noqa: E731

        # The clean image first: an example misclassified as it is stays as it is.
        fooled = tf.not_equal(tf.argmax(clean_logits, axis=1, output_type=tf.int32), y)
        best = (tf.identity(x), fooled, tf.fill(tf.shape(fooled), tf.constant(-float("inf"))))

        def combine(best, run):
            x_best, fooled, loss = best
            newly = run["fooled"] & ~fooled
            higher = ~fooled & ~run["fooled"] & (run["best_loss"] > loss)
            take = newly | higher
            return (tf.where(per_example(take), run["x_adv"], x_best), fooled | run["fooled"],
                    tf.where(take, run["best_loss"], loss))

        for r in range(self.runs):  # a handful of runs, each a compiled loop
            target = targets[:, r // self.restarts] if self.targeted else y
            run = lambda best=best, target=target, r=r: combine(  # noqa: E731
                best, self._run(logits_fn, x, y, target, run_seeds[r]))
            if r == 0:
                best = run()
            else:  # nothing left to attack: skip the run
                best = tf.cond(tf.reduce_all(best[1]), lambda best=best: best, run)
        return best[0]

    def trace(self, logits_fn, x, y, seed=None):
        """The first run's per-step record, for tests and plots: a dict of [steps + 1,
        batch] tensors "loss" (at the current point), "best_loss_trace" (best so far) and
        "step_size", and the run's "x_adv", "fooled" and "best_loss"."""
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, tf.int32)
        seed = tf.cast(tf.constant([0, 0]) if seed is None else seed, tf.int32)
        target = self._targets(y, self._expected_logits(logits_fn, x))[:, 0] if self.targeted else y
        run_seed = seeds.split(seed, self.runs)[0] if self.runs > 1 else seed
        return self._run(logits_fn, x, y, target, run_seed, record=True)

    def _settings(self):
        return dict(
            eps=self.eps,
            steps=self.steps,
            norm=self.norm,
            loss=self.loss,
            restarts=self.restarts,
            targeted=self.targeted,
            target_classes=self.target_classes,
            rho=self.rho,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            eot_samples=self.eot_samples,
        )

    def replace(self, **changes):
        """A copy with some settings changed, e.g. `apgd.replace(loss="dlr", targeted=True)`."""
        return APGD(**{**self._settings(), **changes})

    def get_config(self):
        return self._settings()

    @classmethod
    def from_config(cls, config):
        return cls(**config)
