"""FAB: its projection is the exact constrained minimizer, it finds the exact minimum
distance to a linear model's boundary, and on LeNet-5 it is as strong as PGD at eps."""

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from anp_vs_tf.attacks import FAB, PGD
from anp_vs_tf.attacks.fab import boundary_projection


# -- the projection ------------------------------------------------------------------


def random_instances(seed, rows, features):
    """Points in [0, 1], hyperplanes near and far (some beyond the box's reach), some
    coordinates that the hyperplane ignores and some points on the box's faces."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, (rows, features))
    t[::4, :3] = rng.integers(0, 2, (len(t[::4]), 3))  # on the faces: no room one way
    w = rng.normal(size=(rows, features))
    w[::3, rng.integers(0, features)] = 0.0
    offset = rng.normal(size=rows) * rng.choice([0.05, 0.5, 2.0, 6.0, 20.0], rows)
    b = np.sum(w * t, axis=1) + offset
    return t.astype("float32"), w.astype("float32"), b.astype("float32")


def nearest_corner(t, w, b):
    """Where no point of the box is on the hyperplane: the corner furthest toward it."""
    toward = np.sign(b - w @ t)
    return np.where(w == 0, t, np.where(toward * w > 0, 1.0, 0.0))


@pytest.mark.parametrize("features", [10, 20])
def test_linf_projection_is_the_linear_programs_solution(features):
    """min ||d||_inf s.t. w.(t + d) = b, 0 <= t + d <= 1, as scipy's linprog solves it
    (variables d and s, minimize s with -s <= d_i <= s)."""
    t, w, b = random_instances(features, 40, features)
    d = boundary_projection(t, w, b, "linf").numpy()
    n = features
    a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    feasible = 0
    for i in range(len(t)):
        t64, w64, b64 = t[i].astype(float), w[i].astype(float), float(b[i])
        lp = scipy.optimize.linprog(
            np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * n),
            A_eq=np.r_[w64, 0.0][None], b_eq=[b64 - w64 @ t64],
            bounds=[(-ti, 1 - ti) for ti in t64] + [(0, None)],
        )
        z = t64 + d[i]
        assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
        assert np.all(d[i][w[i] == 0] == 0)
        if lp.status == 2:  # infeasible: the box does not reach the hyperplane
            np.testing.assert_allclose(z, nearest_corner(t64, w64, b64), atol=1e-6)
            continue
        assert lp.status == 0, lp.message
        feasible += 1
        assert abs(w64 @ z - b64) <= 1e-4 * (1 + np.abs(w64 * z).sum())
        assert np.abs(d[i]).max() == pytest.approx(lp.x[-1], abs=2e-6)
    assert 20 <= feasible < len(t)  # both cases were tried


@pytest.mark.parametrize("features", [10, 20])
def test_l2_projection_is_the_quadratic_programs_solution(features):
    """min ||d||_2 s.t. w.(t + d) = b, 0 <= t + d <= 1, as scipy's SLSQP solves it."""
    t, w, b = random_instances(100 + features, 24, features)
    d = boundary_projection(t, w, b, "l2").numpy()
    solved = 0
    for i in range(len(t)):
        t64, w64, b64 = t[i].astype(float), w[i].astype(float), float(b[i])
        z = t64 + d[i]
        if abs(w64 @ z - b64) > 1e-4 * (1 + np.abs(w64 * z).sum()):  # beyond reach: the corner
            np.testing.assert_allclose(z, nearest_corner(t64, w64, b64), atol=1e-6)
            corner = nearest_corner(t64, w64, b64)
            assert abs(w64 @ corner - b64) > 1e-3  # and truly so
            continue
        qp = scipy.optimize.minimize(
            lambda v: v @ v, np.zeros(features), jac=lambda v: 2 * v, method="SLSQP",
            bounds=[(-ti, 1 - ti) for ti in t64],
            constraints=[dict(type="eq", fun=lambda v: w64 @ (t64 + v) - b64, jac=lambda v: w64)],
            options=dict(ftol=1e-14, maxiter=500),
        )
        assert qp.success, qp.message
        solved += 1
        np.testing.assert_allclose(d[i], qp.x, atol=2e-5)
    assert solved >= 12


def test_projection_runs_under_xla_and_agrees():
    t, w, b = random_instances(7, 16, 30)
    plain = boundary_projection(t, w, b, "linf")
    xla = tf.function(lambda t, w, b: boundary_projection(t, w, b, "linf"), jit_compile=True)(t, w, b)
    np.testing.assert_allclose(xla.numpy(), plain.numpy(), atol=1e-6)


# -- a linear model: the minimum distance is known ----------------------------------


def linear_problem(classes=3, batch=8, seed=1):
    """logits = x W + c on 4x4x1 images near 0.5, where the box does not bind: the
    minimum distance to misclassification is min_k |z_y - z_k| / ||W_y - W_k||_dual."""
    rng = np.random.default_rng(seed)
    features = 16
    weights = (rng.normal(size=(features, classes)) * 0.3).astype("float32")
    bias = (rng.normal(size=classes) * 0.05).astype("float32")
    x = (0.5 + rng.uniform(-0.05, 0.05, (batch, 4, 4, 1))).astype("float32")
    logits_fn = lambda z: tf.reshape(z, [-1, features]) @ weights + bias  # noqa: E731
    logits = x.reshape(batch, -1).astype(float) @ weights + bias
    y = logits.argmax(1).astype("int32")

    def distance(norm):
        dual = 1 if norm == "linf" else 2
        return np.array([min(abs(logits[i, y[i]] - logits[i, k]) / np.linalg.norm(weights[:, y[i]] - weights[:, k], dual)
                             for k in range(classes) if k != y[i]) for i in range(batch)])

    return logits_fn, x, y, distance


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [True, False])
def test_fab_finds_the_minimum_distance_to_a_linear_boundary(norm, targeted):
    logits_fn, x, y, distance = linear_problem()
    exact = distance(norm)
    assert exact.max() < 0.4 if norm == "linf" else True  # the box (0.45 away) does not bind
    fab = FAB(0.3, norm=norm, targeted=targeted, target_classes=2)
    x_adv, norms, found = tf.function(lambda x, y: fab.minimum_norm(logits_fn, x, y, tf.constant([0, 1])))(x, y)
    x_adv, norms = x_adv.numpy(), norms.numpy()
    assert found.numpy().all()
    assert (logits_fn(x_adv).numpy().argmax(1) != y).all()
    delta = (x_adv - x).reshape(len(x), -1)
    measured = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    np.testing.assert_allclose(norms, measured, rtol=1e-5)
    # Never below the true minimum; above it by FAB's fixed point, where eta, beta and
    # alpha_max balance (0.52% with the defaults): 5e-4 in L-inf at distances of ~0.09.
    assert (norms >= exact * (1 - 1e-5)).all()
    assert (norms <= exact * 1.006).all()
    if norm == "linf":
        np.testing.assert_allclose(norms, exact, atol=1e-3)
    # The final search walks the rest of the way, to the boundary itself.
    search = fab.replace(final_search_steps=3)
    searched = tf.function(lambda x, y: search.minimum_norm(logits_fn, x, y, tf.constant([0, 1])))(x, y)[1].numpy()
    np.testing.assert_allclose(searched, exact, rtol=5e-5)


def test_restarts_only_lower_the_norms_and_misclassified_points_stay():
    logits_fn, x, y, distance = linear_problem(classes=4, batch=6, seed=3)
    y = y.copy()
    y[0] = (y[0] + 1) % 4  # already misclassified: left alone, with norm 0
    run = lambda fab: tf.function(lambda x, y: fab.minimum_norm(logits_fn, x, y, tf.constant([5, 6])))(x, y)  # noqa: E731
    _, single, _ = run(FAB(0.3, steps=10, target_classes=3))
    x_adv, several, found = run(FAB(0.3, steps=10, target_classes=3, restarts=3))
    assert (several.numpy() <= single.numpy() + 1e-7).all()
    assert several.numpy()[0] == 0 and found.numpy()[0]
    np.testing.assert_array_equal(x_adv.numpy()[0], x[0])
    assert (several.numpy()[1:] >= distance("linf")[1:] * (1 - 1e-5)).all()


def test_call_returns_x_where_the_minimum_norm_is_above_eps():
    logits_fn, x, y, distance = linear_problem()
    exact = distance("linf")
    eps = float(np.median(exact))
    x_adv = FAB(eps, steps=30, target_classes=2)(logits_fn, x, y, tf.constant([0, 1])).numpy()
    broken = logits_fn(x_adv).numpy().argmax(1) != y
    np.testing.assert_array_equal(broken, exact * 1.006 < eps)  # none too close to call here
    np.testing.assert_array_equal(x_adv[~broken], x[~broken])
    assert np.abs(x_adv - x).reshape(len(x), -1).max(1)[broken].max() <= eps


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fab_in_a_compiled_function_matches_the_eager_attack(jit_compile):
    logits_fn, x, y, _ = linear_problem(classes=4, batch=5, seed=2)
    fab = FAB(0.06, steps=4, target_classes=2, restarts=2)  # with a random restart
    seed = tf.constant([7, 8])
    eager = fab.minimum_norm(logits_fn, x, y, seed)
    compiled = tf.function(lambda x, y: fab.minimum_norm(logits_fn, x, y, seed), jit_compile=jit_compile)(x, y)
    np.testing.assert_allclose(compiled[0].numpy(), eager[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(compiled[1].numpy(), eager[1].numpy(), rtol=1e-4)
    np.testing.assert_array_equal(compiled[2].numpy(), eager[2].numpy())
    norms = np.sort(eager[1].numpy())
    at_eps = fab.replace(eps=float(norms[1] + norms[2]) / 2)  # breaks two of the five
    call = tf.function(lambda x, y: at_eps(logits_fn, x, y, seed), jit_compile=jit_compile)(x, y).numpy()
    broken = eager[1].numpy() <= at_eps.eps
    assert broken.sum() == 2
    np.testing.assert_array_equal(logits_fn(call).numpy().argmax(1) != y, broken)
    np.testing.assert_array_equal(call[~broken], x[~broken])


def test_empty_and_dynamic_batches():
    logits_fn, x, y, _ = linear_problem()
    fab = FAB(0.1, steps=3, target_classes=2)
    assert fab(logits_fn, x[:0], y[:0]).shape == (0, 4, 4, 1)
    spec = [tf.TensorSpec([None, 4, 4, 1]), tf.TensorSpec([None], tf.int32)]
    dynamic = tf.function(lambda x, y: fab.minimum_norm(logits_fn, x, y, tf.constant([1, 2])), input_signature=spec)
    assert dynamic(x[:0], y[:0])[0].shape == (0, 4, 4, 1)
    np.testing.assert_allclose(dynamic(x, y)[1].numpy(),
                               fab.minimum_norm(logits_fn, x, y, tf.constant([1, 2]))[1].numpy(), rtol=1e-5)


def test_passes_and_steps_are_while_loops():
    """One loop over the passes in the graph, the steps a loop inside it: not unrolled."""
    logits_fn, x, y, _ = linear_problem(classes=10, batch=2)
    fab = FAB(0.1, steps=100, target_classes=9)
    graph = tf.function(lambda x, y: fab(logits_fn, x, y, tf.constant([0, 0]))).get_concrete_function(
        tf.constant(x), tf.constant(y)).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 1
    assert len(graph.get_operations()) < 200


# -- LeNet-5 on MNIST --------------------------------------------------------------


EPS = 0.15  # where the LeNet of the fixture keeps about a third of its accuracy


@pytest.fixture(scope="module")
def lenet_fab(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    x, y = tf.constant(x[:50]), tf.constant(y[:50])
    fab = FAB(EPS, steps=30, target_classes=3)  # a short FAB-T: 3 targets of 30 steps
    logits_fn = trained_lenet.inference_logits
    x_adv, norms, found = tf.function(lambda x, y: fab.minimum_norm(logits_fn, x, y, tf.constant([0, 1])))(x, y)
    return fab, logits_fn, x, y, x_adv.numpy(), norms.numpy(), found.numpy()


def predict(logits_fn, x):
    return np.argmax(logits_fn(tf.constant(x)).numpy(), axis=1)


def test_minimum_norm_adversarials_on_lenet_are_misclassified_and_valid(lenet_fab):
    _, logits_fn, x, y, x_adv, norms, found = lenet_fab
    x, y = x.numpy(), y.numpy()
    clean = predict(logits_fn, x) == y
    assert found[clean].mean() > 0.9
    assert (norms[~clean] == 0).all() and found[~clean].all()
    assert (predict(logits_fn, x_adv)[found & clean] != y[found & clean]).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    np.testing.assert_allclose(np.abs(x_adv - x).reshape(len(x), -1).max(1)[found], norms[found], rtol=1e-5)
    assert 0.02 < np.median(norms[clean]) < 0.3  # a LeNet trained without attacks: small


def test_fab_t_on_lenet_is_as_strong_as_pgd(lenet_fab):
    """Every returned point that is misclassified is inside the eps-ball and the box; the
    robust accuracy is the minimum_norm's count of norms above eps, and within a few
    points of PGD-40's (measured: 32% and 34% on these 50 images, clean 98%)."""
    fab, logits_fn, x, y, _, norms, _ = lenet_fab
    x_adv = tf.function(lambda x, y: fab(logits_fn, x, y, tf.constant([0, 1])))(x, y).numpy()
    x, y = x.numpy(), y.numpy()
    wrong = predict(logits_fn, x_adv) != y
    clean = predict(logits_fn, x) == y
    changed = np.abs(x_adv - x).reshape(len(x), -1).max(1)
    assert changed[wrong & clean].max() <= EPS and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (changed[~wrong] == 0).all()
    fab_accuracy = 1 - wrong.mean()
    assert fab_accuracy == pytest.approx(np.mean(clean & (norms > EPS)))
    pgd = PGD(EPS, 2.5 * EPS / 40, 40)
    pgd_adv = tf.function(lambda x, y: pgd(logits_fn, x, y, tf.constant([0, 1])))(tf.constant(x), tf.constant(y))
    pgd_accuracy = np.mean(predict(logits_fn, pgd_adv.numpy()) == y)
    print(f"robust accuracy at eps {EPS}: FAB-T {fab_accuracy:.2f}, PGD-40 {pgd_accuracy:.2f}, clean {clean.mean():.2f}")
    assert clean.mean() - fab_accuracy > 0.3  # the attack does break most points
    assert fab_accuracy <= pgd_accuracy + 0.06


# -- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [(dict(eps=-0.1), ValueError, "eps"), (dict(steps=0), ValueError, "steps"), (dict(steps=2.5), ValueError, "steps"),
     (dict(norm="l3"), ValueError, "norm"), (dict(norm="l1"), NotImplementedError, "L1"),
     (dict(targeted="yes"), ValueError, "targeted"), (dict(target_classes=0), ValueError, "target_classes"),
     (dict(restarts=0), ValueError, "restarts"), (dict(alpha_max=1.5), ValueError, "alpha_max"),
     (dict(eta=0.9), ValueError, "eta"), (dict(beta=1.0), ValueError, "beta"),
     (dict(clip_min=1.0, clip_max=0.0), ValueError, "clip_min"),
     (dict(final_search_steps=-1), ValueError, "final_search_steps")],
)
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        FAB(**{"eps": 0.3, **kwargs})


def test_too_many_target_classes_for_the_model_are_refused():
    logits_fn, x, y, _ = linear_problem(classes=3)
    with pytest.raises(ValueError, match="target_classes=9 needs more than 3 classes"):
        FAB(0.3, steps=2)(logits_fn, x, y)


def test_config_round_trip():
    fab = FAB(8 / 255, steps=50, norm="l2", targeted=False, restarts=3, alpha_max=0.2, eta=1.1, beta=0.8,
              final_search_steps=2)
    again = FAB.from_config(fab.get_config())
    assert again.get_config() == fab.get_config()
    assert repr(again) == repr(fab) and "norm='l2'" in repr(fab)
    assert fab.replace(eps=0.1).eps == 0.1 and fab.replace(eps=0.1).restarts == 3
    assert FAB(0.3).passes == 9 and fab.passes == 3
