"""The fast adaptive boundary attack, FAB (Croce & Hein, ICML 2020), compiled.

FAB looks for the adversarial example of smallest L-infinity (or L2) norm. At each step
it linearizes the decision boundary at the current point x1: for the targeted version
FAB-T, the hyperplane where the logit of the target class t equals that of the true
class y, w.z = b with w the gradient of (z_t - z_y) at x1. It projects both x1 and the
clean point x0 onto that hyperplane within the valid box (`boundary_projection`), and
steps to the convex combination (x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha: eta
overshoots the linearized boundary a little, alpha (at most alpha_max) biases the step
toward x0, so the iterates stay near the clean point. Whenever the new point is
misclassified it is kept if its norm is the smallest so far, and the next iterate is
pulled back toward x0: x1 = x0 + beta (x1 - x0).

FAB-T as AutoAttack's standard version runs it once per target class, the
`target_classes` highest non-true clean logits (9 on 10 classes), with one restart and
100 steps; the untargeted version (`targeted=False`) linearizes, at every step, the
boundary to the class whose linearized boundary is the closest, which needs the gradient
of every logit. `__call__` returns, as an AutoAttack member does, the smallest
adversarial found where its norm is <= eps and x elsewhere; `minimum_norm` returns the
smallest adversarials found and their norms, whatever eps.

The same contract as `PGD`: `attack(logits_fn, x, y, seed) -> x_adv`, settings bound at
construction, stateless seeds (only restarts after the first start at random), any (even
empty or dynamic) batch, channel-last or any layout (the attack is per pixel). The
passes (target classes x restarts) are one outer `tf.while_loop`, each pass's steps an
inner one. The reference is the authors' PyTorch code, fra31/auto-attack,
autoattack/fab_base.py, fab_pt.py and fab_projections.py; `FAB`'s docstring says where
this differs.
"""

import math
import numbers

import keras
import tensorflow as tf

from anp_vs_tf import kernels, seeds
from anp_vs_tf.attacks.pgd import unless_empty
from anp_vs_tf.distribute import replica_rows

NORMS = ("linf", "l2")
_FAR = 1e12  # the breakpoint of a coordinate the hyperplane does not depend on


def _rows(v):
    """v as [batch, features]."""
    return tf.reshape(v, tf.stack([tf.shape(v)[0], -1]))


def _norm(v, norm):
    """Per-example norm of v (any rank), shape [batch]."""
    flat = _rows(v)
    if norm == "linf":
        return tf.reduce_max(tf.abs(flat), axis=1)
    return tf.sqrt(tf.reduce_sum(tf.square(flat), axis=1))


def boundary_projection(points, w, b, norm="linf", clip_min=0.0, clip_max=1.0):
    """The smallest step d (in the L-infinity or L2 norm) that takes each row of `points`
    onto its hyperplane {z : w.z = b} within the box [clip_min, clip_max].

    points, w: [rows, features]; b: [rows]. Returns d, [rows, features]: the minimizer of
    ||d|| subject to w.(points + d) = b and clip_min <= points + d <= clip_max. Where the
    box does not reach the hyperplane, d goes to the corner of the box that is nearest to
    it (in w.z), as the reference's `projection_linf` / `projection_l2` do. Coordinates
    where w is 0 do not move.

    The minimizer moves every coordinate toward the hyperplane, by min(lam * u_i, p_i),
    with p_i the room left in the box in that direction and u_i = 1 (L-infinity) or
    |w_i| (L2), for the smallest lam >= 0 that reaches the hyperplane: w.d is piecewise
    linear and monotone in lam, with a breakpoint where each coordinate hits the box.
    The breakpoints are sorted once per row; the one segment where w.d crosses the
    required value is found by counting and solved in closed form (no bisection).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    t = tf.convert_to_tensor(points, tf.float32)
    w = tf.convert_to_tensor(w, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    features = tf.shape(t)[1]
    side = tf.reduce_sum(w * t, axis=1) - b
    sign = tf.where(side >= 0, 1.0, -1.0)
    w = w * sign[:, None]
    need = -tf.abs(side)  # the change of w.z the step must make (w.z >= b after the flip)

    abs_w = tf.abs(w)
    moves = abs_w > 0
    direction = tf.where(w > 0, -1.0, 1.0)  # every coordinate lowers w.z
    room = tf.maximum(tf.where(w > 0, t - clip_min, clip_max - t), 0.0)
    rate = tf.ones_like(abs_w) if norm == "linf" else abs_w
    breakpoint = tf.where(moves, tf.minimum(room / tf.where(moves, rate, 1.0), _FAR), _FAR)

    order = tf.argsort(breakpoint, axis=1, stable=True)
    r = tf.gather(breakpoint, order, batch_dims=1)
    saturated = tf.gather(abs_w * room, order, batch_dims=1)  # |w.d| of a coordinate at the box
    slope = tf.gather(abs_w * rate, order, batch_dims=1)  # d|w.d|/d lam of a free coordinate
    saturated_up_to = tf.cumsum(saturated, axis=1)
    saturated_before = tf.cumsum(saturated, axis=1, exclusive=True)
    slope_after = tf.cumsum(slope, axis=1, reverse=True, exclusive=True)
    slope_from = tf.cumsum(slope, axis=1, reverse=True)
    # w.d at lam = r[k]; it falls with k, and the step stops at the first segment where
    # it gets below `need`.
    reached = -(saturated_up_to + r * slope_after)
    passed = tf.reduce_sum(tf.cast(reached >= need[:, None], tf.int32), axis=1)
    feasible = passed < features
    k = tf.minimum(passed, features - 1)[:, None]
    lower = tf.where(k > 0, tf.gather(r, tf.maximum(k - 1, 0), batch_dims=1), 0.0)
    upper = tf.gather(r, k, batch_dims=1)
    free_slope = tf.gather(slope_from, k, batch_dims=1)
    lam = (-need[:, None] - tf.gather(saturated_before, k, batch_dims=1)) / tf.maximum(free_slope, 1e-30)
    lam = tf.clip_by_value(lam, lower, upper)
    step = tf.where(feasible[:, None], tf.minimum(lam * rate, room), room)
    return tf.where(moves, direction * step, 0.0)


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class FAB:
    """FAB (targeted: FAB-T, as in AutoAttack's standard set), L-infinity or L2.

    Args:
        eps: the radius AutoAttack counts: `__call__` returns an adversarial only where
            its norm is <= eps. Also the radius (times 0.5) of the random starts.
        steps: iterations per pass (target class and restart).
        norm: "linf" or "l2" (the reference's L1 version is not implemented).
        targeted: True (FAB-T) linearizes the boundary to one target class per pass;
            False linearizes, at every step, the boundary to the nearest class (it takes
            the gradient of every logit, as many backward passes as classes).
        target_classes: FAB-T's passes, on the classes of the 2nd, 3rd, ... highest
            clean logit; at most the number of classes minus 1.
        restarts: runs per target class; the first starts at x, the others at a random
            point of norm eps / 2 around it (uniform in the L-infinity ball scaled to it,
            a Gaussian direction for L2), clipped to the box.
        alpha_max: the largest weight of the step from x0 (the bias toward x).
        eta: the overshoot of the projection on the linearized boundary, >= 1.
        beta: the pull back toward x after an adversarial iterate, in (0, 1).
        clip_min, clip_max: the valid input range.
        final_search_steps: after all passes, steps of the original FAB's final search
            (its "linear approximation search", off in AutoAttack) on the segment from x
            to the adversarial found: regula falsi on the logit margin, bisection where
            the margins do not bracket the boundary. 0 (default, as AutoAttack) skips it.

    As the reference: only the examples classified correctly are attacked (the others
    are returned as they are, with norm 0); the adversarial check is untargeted (any
    class but y), also in FAB-T; an example AutoAttack counts as broken (norm <= eps) is
    not attacked again by later passes (their result is the same: broken or not, from
    the first pass that breaks it). Unlike the reference, the passes run on every
    example of the batch (the loop ends once every one is broken), and the projection
    is solved by sorting and counting instead of bisection (the same minimizer).
    """

    def __init__(
        self,
        eps,
        steps=100,
        norm="linf",
        targeted=True,
        target_classes=9,
        restarts=1,
        alpha_max=0.1,
        eta=1.05,
        beta=0.9,
        clip_min=0.0,
        clip_max=1.0,
        final_search_steps=0,
    ):
        if not _is_number(eps) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}.")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        if norm == "l1":
            raise NotImplementedError("FAB's L1 version (the reference's projection_l1) is not implemented; "
                                      "norm must be 'linf' or 'l2'.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be True or False, got {targeted!r}.")
        if not _is_int(target_classes) or target_classes < 1:
            raise ValueError(f"target_classes must be a positive integer, got {target_classes!r}.")
        if not _is_int(restarts) or restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {restarts!r}.")
        if not 0 <= alpha_max <= 1:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}.")
        if not (eta >= 1 and math.isfinite(eta)):
            raise ValueError(f"eta (the overshoot) must be a finite number >= 1, got {eta}.")
        if not 0 < beta < 1:
            raise ValueError(f"beta (the backward step) must be in (0, 1), got {beta}.")
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be below clip_max, got {clip_min}, {clip_max}.")
        if not _is_int(final_search_steps) or final_search_steps < 0:
            raise ValueError(f"final_search_steps must be a non-negative integer, got {final_search_steps!r}.")
        self.eps = float(eps)
        self.steps = int(steps)
        self.norm = norm
        self.targeted = targeted
        self.target_classes = int(target_classes)
        self.restarts = int(restarts)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.final_search_steps = int(final_search_steps)

    def __repr__(self):
        return (
            f"FAB(eps={self.eps}, steps={self.steps}, norm={self.norm!r}, targeted={self.targeted}, "
            f"target_classes={self.target_classes}, restarts={self.restarts}, alpha_max={self.alpha_max}, "
            f"eta={self.eta}, beta={self.beta}, final_search_steps={self.final_search_steps})"
        )

    @property
    def passes(self):
        """The runs of `steps` iterations: restarts, times target classes for FAB-T."""
        return self.restarts * (self.target_classes if self.targeted else 1)

    # -- the entry points ------------------------------------------------------------

    def __call__(self, logits_fn, x, y, seed=None):
        """Per example the smallest adversarial found if its norm is <= eps, else x."""
        x_adv, _, _ = self._guarded(logits_fn, x, y, seed, threshold=self.eps)
        return x_adv

    def minimum_norm(self, logits_fn, x, y, seed=None):
        """The smallest adversarial found per example, whatever eps: (x_adv, norms, found).

        x_adv is x where nothing was found (norm inf, found False) and for an example
        already misclassified (norm 0, found True). Every pass runs on every example.
        """
        return self._guarded(logits_fn, x, y, seed, threshold=None)

    def _guarded(self, logits_fn, x, y, seed, threshold):
        x = tf.convert_to_tensor(x)
        dtype, x = x.dtype, tf.cast(x, tf.float32)  # the attack's arithmetic is float32
        y, seed = tf.cast(y, tf.int32), seeds.attack_seed(seed)

        def nothing():
            rows = tf.shape(x)[0]
            return tf.identity(x), tf.zeros([rows], tf.float32), tf.ones([rows], tf.bool)

        x_adv, norms, found = unless_empty(x, lambda: self._attack(logits_fn, x, y, seed, threshold), nothing)
        return tf.cast(x_adv, dtype), norms, found

    # -- one step ----------------------------------------------------------------------

    def _tape_boundary(self, logits_fn, x1, y, target):
        """(df, dg): the logit differences z_k - z_y at x1 and their gradients, for the
        target (FAB-T: [batch], [batch, ...]) or every class (then [batch, classes] and
        [batch, classes, ...], with df of class y a huge 1e10)."""
        with tf.GradientTape(persistent=not self.targeted) as tape:
            tape.watch(x1)
            logits = tf.cast(logits_fn(x1), tf.float32)
            true = tf.gather(logits, y, axis=1, batch_dims=1)
            if self.targeted:
                df = tf.gather(logits, target, axis=1, batch_dims=1) - true
                total = tf.reduce_sum(df)
            else:
                classes = logits.shape[-1]
                columns = [tf.reduce_sum(logits[:, k] - true) for k in range(classes)]
        if self.targeted:
            return df, tape.gradient(total, x1)
        dg = tf.stack([tape.gradient(column, x1) for column in columns], axis=1)
        del tape
        df = tf.where(tf.one_hot(y, classes) > 0, 1e10, logits - true[:, None])
        return df, dg

    def _boundary(self, logits_fn, x1, y, target):
        # Where the kernel choice says so (an AVX2 CPU), as PGD's gradient: a function of
        # its own, not inlined into the loop, so oneDNN rewrites its MaxPoolGrad.
        if not tf.inside_function() or not kernels.choose().own_gradient_function:
            return self._tape_boundary(logits_fn, x1, y, target)
        own_function = tf.function(lambda x1, y, target: self._tape_boundary(logits_fn, x1, y, target),
                                   experimental_attributes={"_noinline": True})
        return own_function(x1, y, target)

    def _hyperplane(self, logits_fn, x1, y, target):
        """w, b ([batch, features], [batch]) of the linearized boundary w.z = b at x1."""
        df, dg = self._boundary(logits_fn, x1, y, target)
        if not self.targeted:  # the class whose linearized boundary is the nearest
            flat = tf.reshape(dg, tf.concat([tf.shape(dg)[:2], [-1]], 0))
            dual = (tf.reduce_sum(tf.abs(flat), axis=2) if self.norm == "linf"
                    else tf.sqrt(tf.reduce_sum(tf.square(flat), axis=2)))
            nearest = tf.argmin(tf.abs(df) / (dual + 1e-12), axis=1, output_type=tf.int32)
            df = tf.gather(df, nearest, axis=1, batch_dims=1)
            dg = tf.gather(dg, nearest, axis=1, batch_dims=1)
        w = _rows(dg)
        return w, tf.reduce_sum(w * _rows(x1), axis=1) - df

    def _pass(self, logits_fn, x0, x1, y, target):
        """One run of `steps` iterations from x1: (smallest adversarial, its norm), the
        norm inf where no iterate was adversarial."""
        rank = len(x0.shape)
        per_example = lambda v: tf.reshape(v, [-1] + [1] * (rank - 1))  # noqa: E731
        rows = tf.shape(x0)[0]

        def body(i, x1, adv, best):
            w, b = self._hyperplane(logits_fn, x1, y, target)
            both = boundary_projection(tf.concat([_rows(x1), _rows(x0)], 0), tf.concat([w, w], 0),
                                       tf.concat([b, b], 0), self.norm, self.clip_min, self.clip_max)
            d1 = tf.reshape(both[:rows], tf.shape(x0))
            d2 = tf.reshape(both[rows:], tf.shape(x0))
            a1 = tf.maximum(_norm(d1, self.norm), 1e-8)
            a2 = tf.maximum(_norm(d2, self.norm), 1e-8)
            alpha = per_example(tf.clip_by_value(a1 / (a1 + a2), 0.0, self.alpha_max))
            x1 = tf.clip_by_value((x1 + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha,
                                  self.clip_min, self.clip_max)
            fooled = self._predict(logits_fn, x1) != y
            size = _norm(x1 - x0, self.norm)
            better = fooled & (size < best)
            adv = tf.where(per_example(better), x1, adv)
            best = tf.where(better, size, best)
            x1 = tf.where(per_example(fooled), x0 + (x1 - x0) * self.beta, x1)
            return i + 1, tf.stop_gradient(x1), tf.stop_gradient(adv), best

        start = (tf.constant(0), x1, x0, tf.fill([rows], tf.constant(math.inf, tf.float32)))
        _, _, adv, best = tf.while_loop(lambda i, *_: i < self.steps, body, start,
                                        maximum_iterations=self.steps)
        return adv, best

    @staticmethod
    def _predict(logits_fn, x):
        return tf.argmax(logits_fn(x), axis=1, output_type=tf.int32)

    # -- the passes ----------------------------------------------------------------------

    def _random_start(self, x, seed):
        """The reference's restart: x plus a random direction of norm eps / 2, clipped."""
        rows, example = tf.shape(x)[0], tf.shape(x)[1:]
        shape = lambda n: tf.concat([[n], example], 0)  # noqa: E731
        if self.norm == "linf":
            t = replica_rows(lambda n: seeds.stateless_uniform(shape(n), seed, -1.0, 1.0), rows)
        else:
            t = replica_rows(lambda n: tf.random.stateless_normal(shape(n), seed), rows)
        size = tf.maximum(_norm(t, self.norm), 1e-12)
        scale = tf.reshape(0.5 * self.eps / size, [-1] + [1] * (len(x.shape) - 1))
        return tf.clip_by_value(x + tf.cast(t * scale, x.dtype), self.clip_min, self.clip_max)

    def _targets(self, clean_logits, y):
        """[batch, target_classes]: the classes of the highest clean logits but y's."""
        classes = clean_logits.shape[-1]
        if classes is None:
            raise ValueError("FAB needs logits with a known number of classes.")
        if self.targeted and self.target_classes > classes - 1:
            raise ValueError(f"target_classes={self.target_classes} needs more than {classes} classes.")
        if not self.targeted:
            return tf.zeros([tf.shape(y)[0], 1], tf.int32)
        others = tf.where(tf.one_hot(y, classes) > 0, -math.inf, clean_logits)
        return tf.math.top_k(others, k=self.target_classes).indices

    def _attack(self, logits_fn, x, y, seed, threshold):
        per_example = lambda v: tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))  # noqa: E731
        clean_logits = tf.cast(logits_fn(x), tf.float32)
        targets = self._targets(clean_logits, y)
        correct = tf.argmax(clean_logits, axis=1, output_type=tf.int32) == y
        restart_seeds = seeds.split(seed, self.restarts)
        # The reference's `perturb` leaves an example alone once a pass broke it within
        # eps; without a threshold (minimum_norm) every pass runs on every example.
        limit = -1.0 if threshold is None else threshold

        def open_(best):
            return correct & (best > limit)

        def body(p, adv, best):
            restart = p % self.restarts
            target = tf.gather(targets, p // self.restarts if self.targeted else 0, axis=1)
            if self.restarts == 1:
                x1 = x
            else:
                x1 = tf.cond(restart > 0, lambda: self._random_start(x, tf.gather(restart_seeds, restart)),
                             lambda: tf.identity(x))
            run_adv, run_best = self._pass(logits_fn, x, x1, y, target)
            better = open_(best) & (run_best < best)
            return p + 1, tf.where(per_example(better), run_adv, adv), tf.where(better, run_best, best)

        best = tf.where(correct, math.inf, 0.0)
        _, adv, best = tf.while_loop(
            lambda p, adv, best: (p < self.passes) & tf.reduce_any(open_(best)), body,
            (tf.constant(0), x, best), maximum_iterations=self.passes,
        )
        found = tf.math.is_finite(best)
        if self.final_search_steps:
            adv = self._final_search(logits_fn, x, y, adv, correct & found, clean_logits)
            best = tf.where(correct & found, _norm(adv - x, self.norm), best)
        if threshold is not None:
            adv = tf.where(per_example(best <= threshold), adv, x)
        return tf.stop_gradient(adv), best, found

    def _final_search(self, logits_fn, x, y, adv, searched, clean_logits):
        """Narrow each searched example's adversarial down the segment toward x: the
        point where the linear interpolation of the margin z_y - z_c crosses 0 (regula
        falsi, c the adversarial's class), or the midpoint where the margins do not
        bracket it; the misclassified end of the segment is the result."""
        per_example = lambda v: tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))  # noqa: E731

        def margin(logits, c):
            return tf.gather(logits, y, axis=1, batch_dims=1) - tf.gather(logits, c, axis=1, batch_dims=1)

        def body(i, inside, outside, inside_logits, outside_logits):
            c = tf.argmax(outside_logits, axis=1, output_type=tf.int32)
            m_in, m_out = margin(inside_logits, c), -margin(outside_logits, c)
            s = m_in / (m_in + m_out + 1e-10)
            # A little past the interpolated crossing, so that a point on the boundary
            # that still reads as class y does not stall the search at it.
            s = per_example(tf.where((s >= 0) & (s <= 1), s + 1e-3 * (1 - s), 0.5))
            middle = inside * (1 - s) + outside * s
            logits = tf.cast(logits_fn(middle), tf.float32)
            kept = tf.argmax(logits, axis=1, output_type=tf.int32) == y
            inward, outward = (kept & searched)[:, None], (~kept & searched)[:, None]
            inside = tf.where(per_example(inward[:, 0]), middle, inside)
            outside = tf.where(per_example(outward[:, 0]), middle, outside)
            inside_logits = tf.where(inward, logits, inside_logits)
            outside_logits = tf.where(outward, logits, outside_logits)
            return i + 1, inside, outside, inside_logits, outside_logits

        start = (tf.constant(0), x, adv, clean_logits, tf.cast(logits_fn(adv), tf.float32))
        _, _, outside, _, _ = tf.while_loop(lambda i, *_: i < self.final_search_steps, body, start,
                                            maximum_iterations=self.final_search_steps)
        return tf.where(per_example(searched), outside, adv)

    # -- configuration -----------------------------------------------------------------

    def _settings(self):
        return dict(
            eps=self.eps, steps=self.steps, norm=self.norm, targeted=self.targeted,
            target_classes=self.target_classes, restarts=self.restarts, alpha_max=self.alpha_max,
            eta=self.eta, beta=self.beta, clip_min=self.clip_min, clip_max=self.clip_max,
            final_search_steps=self.final_search_steps,
        )

    def replace(self, **changes):
        """A copy with some settings changed, e.g. `fab.replace(eps=0.1, steps=20)`."""
        return FAB(**{**self._settings(), **changes})

    def get_config(self):
        return self._settings()

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value):
    return _is_number(value) and math.isfinite(value) and int(value) == value
