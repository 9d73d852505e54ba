"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), compiled: one
`tf.while_loop` per run.

A score-based attack: it never takes a gradient, only the logits, so it is the check
that a model's robustness is not gradient masking. Each example starts at a random
point of the ball's boundary (vertical stripes of +-eps for L-infinity, a grid of
windows for L2); each iteration proposes one random square window update and keeps it
if it lowers the loss (or misclassifies). The window's area, a fraction p of the image,
shrinks along a fixed schedule of the query budget (`Square.p_selection`).

The same contract as `PGD`: `attack(logits_fn, x, y, seed) -> x_adv`, settings bound at
construction, stateless seeds (so a run is reproducible and the same under XLA),
channel-last images, any (even empty or dynamic) batch. `attack_with_queries` also
returns how many times each example was passed to `logits_fn`. The reference is the
authors' PyTorch code in fra31/auto-attack, autoattack/square.py; the docstring of
`Square` says where this differs from it.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf import seeds
from anp_vs_tf.attacks.pgd import NORMS, unless_empty
from anp_vs_tf.distribute import replica_rows
from anp_vs_tf.losses import cross_entropy

LOSSES = ("margin", "ce")
# The schedule of the paper for 10,000 queries: p is halved after each of these
# iterations (rescaled to the budget, see `Square.p_selection`).
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def margin(labels, logits):
    """Per-example margin z_y - max_{i != y} z_i of integer `labels`, float32, shape [batch].

    Positive exactly where the example is classified correctly with no tie; the attack
    counts an example as misclassified where it is <= 0, as the reference does.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    true = tf.gather(logits, labels, axis=1, batch_dims=1)
    is_true = tf.one_hot(labels, tf.shape(logits)[1], on_value=True, off_value=False)
    return true - tf.reduce_max(tf.where(is_true, tf.constant(-float("inf")), logits), axis=1)


def _centered_rectangles(rows, cols):
    """The L2 window's half: the sum of 1/(k+1)^2 over nested rectangles of half-size k
    around (rows // 2, cols // 2), k = 0 .. max(rows // 2, cols // 2), unit L2 norm.

    A pixel at Chebyshev distance d from the center lies in the rectangles k >= d, so it
    gets the tail sum_{k >= d} 1/(k+1)^2 of the series.
    """
    if rows == 0 or cols == 0:
        return np.zeros([rows, cols])
    terms = max(rows // 2, cols // 2) + 1
    tail = np.cumsum((1.0 / np.arange(1, terms + 1) ** 2)[::-1])[::-1]
    distance = np.maximum(np.abs(np.arange(rows) - rows // 2)[:, None], np.abs(np.arange(cols) - cols // 2)[None, :])
    window = tail[distance]
    return window / np.sqrt(np.sum(window ** 2))


def l2_window(size):
    """The L2 update of a size x size window (the paper's eta): a positive bump on the top
    rows // 2 rows, a negative one below, unit L2 norm. The attack uses it or its transpose."""
    window = np.concatenate([_centered_rectangles(size // 2, size), -_centered_rectangles(size - size // 2, size)])
    return window / np.sqrt(np.sum(window ** 2))


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class Square:
    """The Square attack, L-infinity or L2, untargeted, with per-example queries counted.

    Args:
        eps: radius of the perturbation ball.
        queries: the query budget of a run, per example: the number of times a run may
            pass the example to `logits_fn`, the clean check included. A run is the clean
            check (every example, once for all restarts), the random start and then
            queries - 2 square updates, so with one restart no example is queried more
            than `queries` times; each further restart starts again from a new random
            point and adds at most queries - 1 (at most 1 + restarts * (queries - 1) in
            all). An example is queried no more once it is misclassified: one already
            misclassified on x uses 1 query, one misclassified by the random start 2.
        norm: "linf" or "l2".
        p_init: the first squares' share of the image's area, in (0, 1]; 0.8 in the paper.
        loss: what a square update must lower to be kept: "margin" (z_y - max other
            logit, the paper's choice) or "ce" (minus the cross-entropy). An update that
            misclassifies the example is always kept.
        clip_min, clip_max: the valid input range.
        restarts: independent runs from new random starts, each on the examples that the
            runs before did not misclassify.

    Returns, per example, the first misclassified point a run found; for an example never
    misclassified, the point of lowest loss (the margin, or minus the cross-entropy) of
    all it was queried at, x included.

    As the reference (fra31/auto-attack, autoattack/square.py): the L-infinity start puts
    +-eps on whole columns (one sign per column and channel); a square update sets a
    random s x s window to +-eps (one sign per channel), so every coordinate of a point is
    clip(x + eps) or clip(x - eps); the L2 start is a grid of the paper's windows
    (`l2_window`, one sign per window and channel) and the L2 update moves the
    perturbation of a second window into a new bump on the first, keeping the norm at
    eps; an example counts as misclassified where its margin is <= 0; the side
    s = round(sqrt(p * h * w)) of the square (at least 1; for L2 at least 3 and odd; at
    most min(h, w)) follows the schedule `p_selection`, and a window's corner is drawn
    uniformly from 0 .. max(h - s, 1) - 1 (so, as in the reference, in ART and in the
    paper's own code, a square never reaches the last row or column unless s = h; the
    start covers them).

    Differences: each example draws its own windows, signs and (L2) window orientations,
    where the reference draws one window position, one sign per channel and one
    orientation per iteration for the whole batch (the paper's code draws per example, as
    here). The schedule is rescaled to `queries`, the calls a run may make; the reference
    rescales to its `n_queries`, its number of square updates, and makes 2 calls more (the
    clean check and the start): `Square(eps, n + 2)` makes the reference's n updates, on a
    schedule rescaled to n + 2. An example never misclassified is returned at its
    lowest-loss point, where the reference returns x. L1 and the targeted attack are not
    implemented.
    """

    def __init__(self, eps, queries=5000, norm="linf", p_init=0.8, loss="margin", clip_min=0.0, clip_max=1.0,
                 restarts=1):
        if isinstance(eps, bool) or not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if isinstance(queries, (bool, str)) or int(queries) != queries or queries < 1:
            raise ValueError(f"queries must be a positive integer (the clean check is one), got {queries!r}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if isinstance(p_init, (bool, str)) or not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if not clip_min < clip_max:
            raise ValueError(f"clip_min must be below clip_max, got {clip_min}, {clip_max}.")
        if isinstance(restarts, (bool, str)) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {restarts!r}.")
        self.eps = float(eps)
        self.queries = int(queries)
        self.norm = norm
        self.p_init = float(p_init)
        self.loss = loss
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        self.restarts = int(restarts)

    def __repr__(self):
        return (
            f"Square(eps={self.eps}, queries={self.queries}, norm={self.norm!r}, p_init={self.p_init}, "
            f"loss={self.loss!r}, restarts={self.restarts})"
        )

    # -- the schedule ------------------------------------------------------------------

    def p_selection(self, iteration):
        """The share p of the image a square covers at square update `iteration` (0 for
        the first, after the random start): p_init, halved after each of the iterations
        10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000, rescaled to `queries`
        as the reference does, int(iteration / queries * 10000) (rounded down in floats)."""
        it = int(iteration / self.queries * 10000)
        return self.p_init / 2 ** sum(it > threshold for threshold in HALVINGS)

    def square_size(self, iteration, height, width, channels=1):
        """The side in pixels of the square at square update `iteration` on h x w images."""
        features = height * width * channels
        side = int(round(math.sqrt(self.p_selection(iteration) * features / channels)))
        if self.norm == "linf":
            side = max(side, 1)
        else:
            side = max(side, 3)
            side += 1 - side % 2  # odd
        return min(side, height, width)

    def _size_schedule(self, height, width, channels):
        """The sizes of all square updates as (first iteration, side) at each change."""
        starts, sides = [], []
        for k in range(max(self.queries - 2, 1)):
            side = self.square_size(k, height, width, channels)
            if not sides or side != sides[-1]:
                starts.append(k)
                sides.append(side)
        return starts, sides

    @staticmethod
    def _schedule_entry(iteration, starts):
        """In the graph: the entry of `_size_schedule` that square update `iteration` uses."""
        return tf.maximum(tf.reduce_sum(tf.cast(iteration >= starts, tf.int32)) - 1, 0)

    # -- the attack ----------------------------------------------------------------------

    def _loss(self, y, logits):
        """(margin, loss to lower), float32, shape [batch] each."""
        m = margin(y, logits)
        return m, (m if self.loss == "margin" else -cross_entropy(y, logits))

    def __call__(self, logits_fn, x, y, seed=None):
        """Adversarial examples for (x, y); `seed` is a stateless seed for all random draws."""
        return self.attack_with_queries(logits_fn, x, y, seed)[0]

    def attack_with_queries(self, logits_fn, x, y, seed=None):
        """(x_adv, queries_used): queries_used (int32, shape [batch]) counts, per example,
        the rows of `logits_fn`'s calls that were that example (see `queries`)."""
        x = tf.convert_to_tensor(x)
        y = tf.convert_to_tensor(y)
        if len(x.shape) != 4 or not x.shape[1:].is_fully_defined():
            raise ValueError(f"Square attacks batches of images of known shape [batch, h, w, c], got {x.shape}.")
        seed = seeds.attack_seed(seed)
        return unless_empty(x, lambda: self._attack(logits_fn, x, y, seed),
                            lambda: (tf.identity(x), tf.zeros([0], tf.int32)))

    def _attack(self, logits_fn, x, y, seed):
        x_work = tf.cast(x, tf.float32)
        best_margin, best_loss = self._loss(y, logits_fn(x))
        best, used = x_work, tf.ones(tf.shape(best_margin), tf.int32)
        run_seeds = [seed] if self.restarts == 1 else tf.unstack(seeds.split(seed, self.restarts))
        for run_seed in run_seeds:  # a handful of restarts, each a compiled loop
            attacked = best_margin > 0
            candidate, m, loss, calls = self._single_run(logits_fn, x_work, y, attacked, run_seed, x.dtype)
            take = attacked & ((m <= 0) | (loss < best_loss))
            best = tf.where(take[:, None, None, None], candidate, best)
            best_margin = tf.where(take, m, best_margin)
            best_loss = tf.where(take, loss, best_loss)
            used += calls
        return tf.cast(best, x.dtype), used

    def _single_run(self, logits_fn, x, y, attacked, seed, dtype):
        """One run on the `attacked` rows: (point, its margin, its loss, calls per row).

        The loop's first pass queries the random start, which is kept whatever its loss;
        each later pass one square update. Each pass queries only the examples not yet
        misclassified, gathered into a smaller batch, and the loop ends when there are
        none. Every draw is made for the whole batch and each example takes its row, so an
        example's attack does not depend on which others are still in it.
        """
        rows = tf.shape(x)[0]
        _, height, width, channels = x.shape
        start_seed, loop_seed = tf.unstack(seeds.split(seed, 2))
        starts, sides = self._size_schedule(height, width, channels)
        starts_t, sides_t = tf.constant(starts, tf.int32), tf.constant(sides, tf.int32)
        windows = self._window_tables(height, width, sides) if self.norm == "l2" else None

        def uniform(shape, seed):  # this replica's rows of a draw for the global batch
            return replica_rows(lambda n: seeds.stateless_uniform(tf.concat([[n], shape], 0), seed), rows)

        def body(i, state, margin_min, loss_min, used):
            active = tf.where(margin_min > 0)[:, 0]

            def take(t):
                return tf.gather(t, active)

            x_a, state_a, margin_a, loss_a = take(x), take(state), take(margin_min), take(loss_min)
            step_seed = seeds.fold_in(loop_seed, i)
            entry = self._schedule_entry(i - 1, starts_t)
            state_new = tf.cond(
                tf.equal(i, 0),
                lambda: self._start(x_a, lambda shape: take(uniform(shape, start_seed))),
                lambda: self._square(x_a, state_a, lambda shape: take(uniform(shape, step_seed)), sides_t[entry],
                                     None if windows is None else windows[entry]),
            )
            m, loss = self._loss(take(y), logits_fn(tf.cast(self._point(x_a, state_new), dtype)))
            lower = (loss < loss_a) | tf.equal(i, 0)  # the start is kept whatever its loss
            accept = lower | (m <= 0)
            state_a = tf.where(accept[:, None, None, None], state_new, state_a)
            index = active[:, None]
            return (
                i + 1,
                tf.tensor_scatter_nd_update(state, index, state_a),
                tf.tensor_scatter_nd_update(margin_min, index, tf.where(accept, m, margin_a)),
                tf.tensor_scatter_nd_update(loss_min, index, tf.where(lower, loss, loss_a)),
                tf.tensor_scatter_nd_add(used, index, tf.ones_like(active, tf.int32)),
            )

        passes = self.queries - 1  # the start and queries - 2 squares
        inf = tf.fill([rows], float("inf"))
        initial = (tf.constant(0), tf.zeros_like(x), tf.where(attacked, inf, 0.0), inf, tf.zeros([rows], tf.int32))
        _, state, margin_min, loss_min, used = tf.while_loop(
            lambda i, _, margin_min, *__: (i < passes) & tf.reduce_any(margin_min > 0), body, initial,
            maximum_iterations=passes,
        )
        return self._point(x, state), margin_min, loss_min, used

    # -- L-infinity: the state is the sign of each coordinate's perturbation; L2: the point

    def _point(self, x, state):
        if self.norm == "linf":
            return tf.clip_by_value(x + self.eps * state, self.clip_min, self.clip_max)
        return state

    def _start(self, x, uniform):
        height, width, channels = x.shape[1:]
        if self.norm == "linf":  # one sign per column and channel
            return tf.broadcast_to(self._sign(uniform([1, width, channels])), tf.shape(x))
        tile_of, value, value_t, tiles = self._start_tiles(height, width)
        # Per example and tile: a sign per channel and whether the window is transposed.
        draws = uniform([tiles, channels + 1])
        per_pixel = tf.gather(draws, tf.maximum(tile_of, 0), axis=1)  # [n, h, w, channels + 1]
        window = tf.where(per_pixel[..., -1:] > 0.5, value_t[:, :, None], value[:, :, None])
        delta = tf.where(tile_of[:, :, None] >= 0, window * self._sign(per_pixel[..., :-1]), 0.0)
        return self._project_l2(x, delta)

    def _square(self, x, state, uniform, side, window):
        height, width, channels = x.shape[1:]
        draws = uniform([5 + channels])  # corners of two windows, orientation, signs
        inside = self._window_mask(draws[:, 0:2], side, height, width)
        signs = self._sign(draws[:, None, None, 5:])
        if self.norm == "linf":
            return tf.where(inside, signs, state)
        # L2: a new bump on the first window, added to its old perturbation and scaled to
        # keep the norm the two windows had (plus what is left of eps); the second
        # window's perturbation is cleared.
        other = self._window_mask(draws[:, 2:4], side, height, width)
        delta = state - x

        def window_norm(t):
            return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2], keepdims=True))

        image_norm = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
        both_norm = window_norm(tf.where(inside | other, delta, 0.0))
        old = tf.where(inside, delta, 0.0)
        bump = self._place(window, draws[:, 0:2], draws[:, 4] > 0.5, inside, side, width) * signs
        new = bump + old / (1e-12 + window_norm(old))
        budget = tf.maximum(self.eps ** 2 - tf.square(image_norm), 0.0) / channels + tf.square(both_norm)
        new = new / (1e-12 + window_norm(new)) * tf.sqrt(budget)
        delta = tf.where(inside, new, tf.where(other, 0.0, delta))
        return self._project_l2(x, delta)

    def _project_l2(self, x, delta):
        """x plus delta scaled to L2 norm eps, clipped to the valid range."""
        norm = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
        return tf.clip_by_value(x + delta / (norm + 1e-12) * self.eps, self.clip_min, self.clip_max)

    @staticmethod
    def _sign(u):
        return tf.where(u < 0.5, -1.0, 1.0)

    @staticmethod
    def _corners(u, side, height, width):
        """Per-example top-left corners, uniform in 0 .. max(h - side, 1) - 1, [n, 1, 1, 1] each."""
        def corner(u, length):
            span = tf.cast(length - side, tf.float32)
            first = tf.cast(tf.floor(u * span), tf.int32)
            return tf.clip_by_value(first, 0, tf.maximum(length - side - 1, 0))[:, None, None, None]

        return corner(u[:, 0], height), corner(u[:, 1], width)

    def _window_mask(self, u, side, height, width):
        """[n, h, w, 1]: whether each pixel is in the example's side x side window."""
        top, left = self._corners(u, side, height, width)
        r = tf.range(height)[None, :, None, None]
        c = tf.range(width)[None, None, :, None]
        return (r >= top) & (r < top + side) & (c >= left) & (c < left + side)

    def _place(self, window, u, transposed, inside, side, width):
        """[n, h, w, 1]: the L2 window (or its transpose) at each example's window `inside`.

        `window` is the side x side window at the top-left corner of a flattened h x w
        canvas; each pixel reads it at its offset from the example's corner."""
        height = inside.shape[1]
        top, left = self._corners(u, side, height, width)
        r = tf.clip_by_value(tf.range(height)[None, :, None, None] - top, 0, side - 1)
        c = tf.clip_by_value(tf.range(width)[None, None, :, None] - left, 0, side - 1)
        flat = tf.where(transposed[:, None, None, None], c * width + r, r * width + c)
        return tf.where(inside, tf.gather(window, flat), 0.0)

    @staticmethod
    def _window_tables(height, width, sides):
        """[entries, h * w]: per entry of the size schedule, the L2 window of its side at
        the top-left corner of an h x w canvas, flattened."""
        canvases = np.zeros([len(sides), height, width])
        for k, side in enumerate(sides):
            canvases[k, :side, :side] = l2_window(side)
        return tf.constant(canvases.reshape(len(sides), -1), tf.float32)

    def _start_tiles(self, height, width):
        """The L2 start's grid of windows of side max(h // 5, 1), from (sp, sp) with
        sp = (h - 5 * side) // 2, as many as fit: per pixel its tile (-1 outside), the
        window's value there, and the transposed window's."""
        side = max(height // 5, 1)
        origin = (height - 5 * side) // 2
        tops = [origin + i * side for i in range(height // side) if origin + (i + 1) * side <= height]
        lefts = [origin + j * side for j in range(width // side) if origin + (j + 1) * side <= width]
        tile_of = -np.ones([height, width], np.int32)
        value, value_t = np.zeros([height, width]), np.zeros([height, width])
        window = l2_window(side)
        for t, (top, left) in enumerate((top, left) for top in tops for left in lefts):
            tile_of[top:top + side, left:left + side] = t
            value[top:top + side, left:left + side] = window
            value_t[top:top + side, left:left + side] = window.T
        return (tf.constant(tile_of), tf.constant(value, tf.float32), tf.constant(value_t, tf.float32),
                max(len(tops) * len(lefts), 1))

    # -- settings --------------------------------------------------------------------------

    def _settings(self):
        return dict(eps=self.eps, queries=self.queries, norm=self.norm, p_init=self.p_init, loss=self.loss,
                    clip_min=self.clip_min, clip_max=self.clip_max, restarts=self.restarts)

    def replace(self, **changes):
        """A copy with some settings changed, e.g. `square.replace(queries=1000)`."""
        return Square(**{**self._settings(), **changes})

    def get_config(self):
        return self._settings()

    @classmethod
    def from_config(cls, config):
        return cls(**config)
