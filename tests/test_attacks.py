"""PGD stays in its constraint set, strengthens the loss, and matches a hand-written FGSM."""

import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import kernels
from anp_vs_tf.attacks import PGD, fgsm
from anp_vs_tf.losses import cross_entropy


def per_example_loss(model, x, y):
    return cross_entropy(tf.constant(y), model.inference_logits(tf.constant(x))).numpy()


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.3, 0.05), ("l2", 2.0, 0.5)])
def test_pgd_stays_in_the_ball_and_the_valid_range(trained_lenet, mnist_subset, norm, eps, step):
    _, _, x, y = mnist_subset
    x, y = x[:256], y[:256]
    attack = PGD(eps, step, 10, norm=norm)
    x_adv = attack(trained_lenet.inference_logits, x, y, seed=tf.constant([1, 2])).numpy()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).reshape(len(x), -1)
    if norm == "linf":
        assert np.abs(delta).max() <= eps + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= eps * (1 + 1e-5)
    # MNIST pixels sit at 0 and 1, so the valid range really clips: the attack uses it all.
    assert np.abs(delta).max() > 0.5 * (eps if norm == "linf" else step)


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.3, 0.05), ("l2", 2.0, 0.5)])
def test_pgd_raises_the_loss_above_the_clean_loss(trained_lenet, mnist_subset, norm, eps, step):
    _, _, x, y = mnist_subset
    x, y = x[:256], y[:256]
    x_adv = PGD(eps, step, 10, norm=norm)(trained_lenet.inference_logits, x, y, seed=tf.constant([3, 4]))
    clean, adv = per_example_loss(trained_lenet, x, y), per_example_loss(trained_lenet, x_adv.numpy(), y)
    assert adv.mean() > clean.mean() + 1.0
    assert np.mean(adv >= clean - 1e-4) > 0.95


@pytest.mark.parametrize("chunks", [1, 2])
def test_pgd_is_compiled_as_one_while_loop_per_chunk(chunks):
    """The attack's steps are a tf.while_loop in the graph, not one copy per step; each
    chunk of the batch has its own loop, and no loop takes another's output."""
    model = tf.keras.Sequential([tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)])
    attack = PGD(0.1, 0.01, 25, chunks=chunks)
    x, y = tf.random.uniform((4, 8, 8, 1)), tf.constant([0, 1, 2, 3])
    graph = tf.function(lambda x, y: attack(model, x, y, tf.constant([0, 0]))).get_concrete_function(x, y).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == chunks
    assert not any(inp.op in loops for loop in loops for inp in loop.inputs)
    assert "MatMul" not in [op.type for op in graph.get_operations()]  # the passes live in the loop bodies


@pytest.mark.parametrize("batch", [9, 1])
def test_chunks_attack_the_same_examples(trained_lenet, mnist_subset, batch):
    """Chunking is a schedule, not a different attack: same random start, same steps."""
    _, _, x, y = mnist_subset
    x, y, seed = tf.constant(x[:batch]), tf.constant(y[:batch]), tf.constant([3, 4])
    results = [tf.function(lambda x, y, c=c: PGD(0.3, 0.05, 5, chunks=c)(trained_lenet.inference_logits, x, y, seed))(x, y)
               for c in (1, 2, 3)]  # 9 rows: slices of 4 and 5, of 3, 3 and 3
    for chunked in results[1:]:
        assert chunked.shape == results[0].shape
        np.testing.assert_allclose(chunked.numpy(), results[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("own_function", [True, False])
def test_compiled_attack_takes_each_gradient_in_its_own_function_where_chosen(own_function):
    """Where the kernel choice says so (an AVX2 CPU), a step's gradient is a non-inlined
    function (oneDNN then rewrote its MaxPoolGrad in every trace); the adversarial
    examples are those of the eager attack either way."""
    keras = tf.keras
    model = keras.Sequential([keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.MaxPooling2D(2),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    x, y = tf.random.stateless_uniform((8, 10, 10, 1), [0, 7]), tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    model(x)
    attack, seed = PGD(0.2, 0.05, 4), tf.constant([1, 1])
    with kernels.use(kernels.KernelChoice(attack_chunks=2, own_gradient_function=own_function)):
        compiled = tf.function(lambda x, y: attack(model, x, y, seed))
        np.testing.assert_allclose(compiled(x, y).numpy(), attack(model, x, y, seed).numpy(), atol=1e-6)
        library = compiled.get_concrete_function(x, y).graph.as_graph_def().library.function
    own = [f for f in library if f.attr["_noinline"].b]
    assert len(own) == (2 if own_function else 0)  # one per chunk's loop
    assert all("MaxPoolGrad" in {node.op for node in f.node_def} for f in own)


def test_fgsm_matches_a_hand_computed_signed_gradient_step(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    x, y = tf.constant(x[:64]), tf.constant(y[:64])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(cross_entropy(y, trained_lenet.inference_logits(x)))
    expected = tf.clip_by_value(x + 0.2 * tf.sign(tape.gradient(loss, x)), 0.0, 1.0)
    np.testing.assert_allclose(fgsm(0.2)(trained_lenet.inference_logits, x, y).numpy(), expected.numpy())


def test_restarts_keep_the_worst_case_per_example(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    x, y = x[:128], y[:128]
    seed = tf.constant([5, 6])
    seeds = tf.random.experimental.stateless_split(seed, 3)
    single = [PGD(0.3, 0.05, 3)(trained_lenet.inference_logits, x, y, s) for s in seeds]
    best = PGD(0.3, 0.05, 3, restarts=3)(trained_lenet.inference_logits, x, y, seed)
    losses = np.stack([per_example_loss(trained_lenet, s.numpy(), y) for s in single])
    np.testing.assert_allclose(per_example_loss(trained_lenet, best.numpy(), y), losses.max(0), rtol=1e-5)


def test_zero_steps_without_random_start_is_the_identity(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    out = PGD(0.3, 0.1, 0, random_start=False)(trained_lenet.inference_logits, x[:8], y[:8])
    np.testing.assert_array_equal(out.numpy(), x[:8])


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(eps=-0.1), "eps"), (dict(steps=2.5), "steps"), (dict(norm="l1"), "norm"), (dict(restarts=0), "restarts"),
     (dict(chunks=0), "chunks")],
)
def test_bad_settings_are_refused(kwargs, match):
    settings = dict(eps=0.3, step_size=0.01, steps=5)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PGD(**settings)


def test_config_round_trip():
    attack = PGD(0.03, 0.007, 10, norm="l2", restarts=2, chunks=3)
    again = PGD.from_config(attack.get_config())
    assert again.get_config() == attack.get_config()
