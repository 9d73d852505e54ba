"""The analyses (loss surface, vulnerability saliency) and the PNG figures, on real MNIST."""

import keras
import matplotlib
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import analysis, attacks, models, plots
from anp_vs_tf.losses import cross_entropy
from anp_vs_tf.models.backbone import latent_names
from anp_vs_tf.trainers import RobustModel, get_method

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST_PGD = attacks.PGD(0.3, 0.1, 5)


PRUNED_CONV1 = np.arange(5)


@pytest.fixture(scope="module")
def pruned_lenet(mnist_subset):
    """LeNet-5-Caffe with Beta-Bernoulli masks: one epoch of Bayesian pruning, then five
    conv1 units switched off by hand (one epoch is too short to prune any by itself)."""
    x, y, _, _ = mnist_subset
    keras.utils.set_random_seed(0)
    model = RobustModel(
        models.lenet5_caffe(prunable=True, mask_kwargs=dict(a_init=2.0)),
        get_method("bp", num_train_examples=len(x), beta_kl=4.0), seed=0,
    )
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    conv1 = model.mask_layers[0]
    conv1.a_uc.assign(np.where(np.isin(np.arange(conv1.units), PRUNED_CONV1), -10.0, conv1.a_uc.numpy()))
    assert int(conv1.num_active()) == conv1.units - len(PRUNED_CONV1)
    return model


def clean_loss(model, x, y):
    return cross_entropy([y], model.inference_logits(x[None])).numpy()[0]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 0
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


# -- loss surface -------------------------------------------------------------------


def test_loss_surface_grid_and_centre(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    surface = analysis.loss_surface(trained_lenet, x[0], y[0], resolution=21)
    assert surface["alphas"].shape == surface["betas"].shape == (21,)
    assert surface["losses"].shape == (21, 21)
    np.testing.assert_allclose(surface["alphas"][[0, -1]], [-0.3, 0.3], rtol=1e-6)
    assert abs(surface["alphas"][10]) < 1e-7
    np.testing.assert_allclose(surface["losses"][10, 10], clean_loss(trained_lenet, x[0], y[0]), atol=1e-5)


def test_adversarial_axis_is_the_signed_input_gradient(trained_lenet, mnist_subset):
    """With beta = 0 the grid is x + alpha sign(grad): recompute it with a plain tape."""
    _, _, x, y = mnist_subset
    surface = analysis.loss_surface(trained_lenet, x[1], y[1], radius=0.2, resolution=5)
    image = tf.constant(x[1][None])
    with tf.GradientTape() as tape:
        tape.watch(image)
        loss = cross_entropy([y[1]], trained_lenet.inference_logits(image))
    direction = tf.sign(tape.gradient(loss, image))
    for i, alpha in enumerate(surface["alphas"]):
        moved = tf.clip_by_value(image + alpha * direction, 0.0, 1.0)[0].numpy()
        expected = clean_loss(trained_lenet, moved, y[1])
        np.testing.assert_allclose(surface["losses"][i, 2], expected, rtol=1e-4, atol=1e-5)


def test_loss_rises_more_along_the_adversarial_direction(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    rise_adv, rise_rand = [], []
    for i in range(4):
        losses = analysis.loss_surface(trained_lenet, x[i], y[i], resolution=11, seed=i)["losses"]
        centre = losses[5, 5]
        assert losses[-1, 5] > centre
        rise_adv.append(losses[-1, 5] - centre)
        rise_rand.append(max(losses[5, 0], losses[5, -1]) - centre)
    assert np.mean(rise_adv) > np.mean(rise_rand)


def test_loss_surface_with_an_attack_direction(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    surface = analysis.loss_surface(trained_lenet, x[2], y[2], adversary=FAST_PGD, resolution=7)
    np.testing.assert_allclose(surface["alphas"][[0, -1]], [-FAST_PGD.eps, FAST_PGD.eps], rtol=1e-6)
    assert surface["losses"][-1, 3] > surface["losses"][3, 3]


def test_loss_surface_is_seeded_and_independent_of_chunking(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    one_batch = analysis.loss_surface(trained_lenet, x[3], y[3], resolution=9, seed=5)["losses"]
    chunked = analysis.loss_surface(trained_lenet, x[3], y[3], resolution=9, seed=5, batch_size=7)["losses"]
    other_seed = analysis.loss_surface(trained_lenet, x[3], y[3], resolution=9, seed=6)["losses"]
    np.testing.assert_allclose(chunked, one_batch, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other_seed[:, 4], one_batch[:, 4], rtol=1e-5, atol=1e-6)  # same d_adv
    assert not np.allclose(other_seed[4, :], one_batch[4, :])  # another d_rand


# -- vulnerability saliency ----------------------------------------------------------


def reference_saliency(model, x, x_adv):
    """One example, written out: d/dx mean_l mean |z_l(x) - z_l(x~)|, |.| summed over channels."""
    x, x_adv = tf.constant(x[None]), tf.constant(x_adv[None])
    latents_adv = model.backbone(x_adv, training=False)["latents"]
    with tf.GradientTape() as tape:
        tape.watch(x)
        latents = model.backbone(x, training=False)["latents"]
        v = tf.add_n([tf.reduce_mean(tf.abs(z - za)) for z, za in zip(latents, latents_adv)]) / len(latents)
    saliency = tf.reduce_sum(tf.abs(tape.gradient(v, x)), axis=-1)[0].numpy()
    return saliency / saliency.max()


def test_vulnerability_saliency(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    x, y = x[:4], y[:4]
    x_adv = analysis.attack_batch(trained_lenet, x, y, FAST_PGD, seed=0)
    saliency = analysis.vulnerability_saliency(trained_lenet, x, x_adv)
    assert saliency.shape == (4, 28, 28)
    assert saliency.min() >= 0.0
    np.testing.assert_allclose(saliency.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(saliency[2], reference_saliency(trained_lenet, x[2], x_adv[2]), atol=1e-5)


def test_saliency_without_perturbation_is_zero(pruned_lenet, mnist_subset):
    _, _, x, _ = mnist_subset
    saliency = analysis.vulnerability_saliency(pruned_lenet, x[:3], x[:3])
    assert np.all(np.isfinite(saliency)) and not saliency.any()


def test_first_layer_feature_vulnerability_is_batch_weighted(pruned_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    attack = attacks.PGD(0.3, 0.1, 3, random_start=False)
    whole = analysis.first_layer_feature_vulnerability(pruned_lenet, [(x[:48], y[:48])], attack)
    split = analysis.first_layer_feature_vulnerability(
        pruned_lenet, [(x[:32], y[:32]), (x[32:48], y[32:48])], attack
    )
    assert whole.shape == (20,)
    np.testing.assert_allclose(split, whole, rtol=1e-4, atol=1e-7)
    assert np.all(whole[PRUNED_CONV1] == 0)
    assert np.all(np.delete(whole, PRUNED_CONV1) > 0)


# -- figures ---------------------------------------------------------------------------


@pytest.fixture
def unchanged_pyplot():
    """Plots must neither switch the caller's backend nor open pyplot figures.

    The caller here uses the SVG backend, so that a plot forcing Agg would show.
    """
    original = matplotlib.get_backend()
    matplotlib.use("svg")
    figures = plt.get_fignums()
    yield
    backend, figures_after = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use(original)
    assert backend == "svg"
    assert figures_after == figures


def test_plot_functions_write_pngs(tmp_path, unchanged_pyplot):
    rng = np.random.default_rng(0)
    written = [
        plots.plot_active_units({"conv1_bbd": 7, "dense1_bbd": 0}, {"conv1_bbd": 20, "dense1_bbd": 500},
                                tmp_path / "a" / "units.png", title="units"),
        plots.plot_vulnerability_histograms(
            [("Standard", rng.random(50)), ("ANP-VS", np.r_[np.zeros(30), rng.random(20)]),
             ("all pruned", np.zeros(10))],
            tmp_path / "hist.png", title="input-layer features",
        ),
        plots.plot_loss_surface(np.linspace(-1, 1, 5), np.linspace(-1, 1, 5), rng.random((5, 5)),
                                tmp_path / "surface.png"),
        plots.plot_saliency(rng.random((1, 28, 28, 1)), rng.random((1, 28, 28)), tmp_path / "one.png"),
        plots.plot_saliency(rng.random((10, 28, 28, 1)), rng.random((10, 28, 28)), tmp_path / "many.png",
                            labels=list(range(10)), title="saliency"),
    ]
    assert written[0] == tmp_path / "a" / "units.png"
    for path in written:
        assert_png(path)


class OneBatchOnly:
    """A data set that fails if read past its first batch."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size, self.batches_read = x, y, batch_size, 0

    def __iter__(self):
        for start in range(0, len(self.x), self.batch_size):
            self.batches_read += 1
            assert self.batches_read == 1, "write_run_plots read past the first batch"
            yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]


def test_write_run_plots_for_a_pruned_model(
    pruned_lenet, mnist_subset, tmp_path, unchanged_pyplot, monkeypatch
):
    _, _, x, y = mnist_subset
    dataset = OneBatchOnly(x, y, 32)
    names = latent_names(pruned_lenet.backbone)
    stored = {name: [float(i)] * 20 for i, name in reversed(list(enumerate(names)))}
    histograms = []

    def not_called(*args, **kwargs):
        raise AssertionError("the stored per-feature vulnerability should be used")

    def recording(series, *args, **kwargs):
        histograms.append(series)
        return draw_histograms(series, *args, **kwargs)

    draw_histograms = plots.plot_vulnerability_histograms
    monkeypatch.setattr(analysis, "first_layer_feature_vulnerability", not_called)
    monkeypatch.setattr(plots, "plot_vulnerability_histograms", recording)
    paths = plots.write_run_plots(
        pruned_lenet, dataset, FAST_PGD, tmp_path, metrics={"feature_vulnerability_wb": stored}
    )
    assert sorted(p.name for p in paths) == [
        "active_units.png", "feature_vulnerability.png", "loss_surface.png", "saliency.png"
    ]
    assert dataset.batches_read == 1
    [[(label, values)]] = histograms
    assert names[0] in label and values == stored[names[0]]  # the first layer in latent order
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_write_run_plots_without_masks(trained_lenet, mnist_subset, tmp_path, unchanged_pyplot):
    _, _, x, y = mnist_subset
    paths = plots.write_run_plots(trained_lenet, OneBatchOnly(x, y, 16), FAST_PGD, tmp_path, num_saliency=3)
    assert sorted(p.name for p in paths) == ["feature_vulnerability.png", "loss_surface.png", "saliency.png"]
    for path in paths:
        assert_png(path)


def test_analyses_compile_once_per_model_without_retracing_warnings(mnist_subset):
    """A report over many models traces each once; TensorFlow must not call that excessive
    retracing, and a compiled analysis must not keep its model alive."""
    import gc
    import logging
    import weakref

    _, _, x, y = mnist_subset
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = tf.get_logger()
    tf_logger.addHandler(handler)
    try:
        x_adv = []
        for seed in range(6):
            keras.utils.set_random_seed(seed)
            model = RobustModel(models.lenet5_caffe(), "standard")
            x_adv.append(analysis.attack_batch(model, x[:8], y[:8], FAST_PGD, seed=0))
            np.testing.assert_allclose(  # the same model's second call: the same attack
                analysis.attack_batch(model, x[:8], y[:8], FAST_PGD, seed=0), x_adv[-1]
            )
        np.testing.assert_allclose(  # keyword arguments reach the compiled function too
            analysis.adversarial_examples(model, tf.constant(x[:8]), tf.constant(y[:8]), FAST_PGD,
                                          seed=analysis._stateless_seed(0, 1)).numpy(),
            x_adv[-1],
        )
    finally:
        tf_logger.removeHandler(handler)
    assert not [r for r in records if "retracing" in r.getMessage()]
    assert not np.allclose(x_adv[0], x_adv[1])  # each call attacked its own model

    dead = weakref.ref(model)
    del model
    gc.collect()
    assert dead() is None
