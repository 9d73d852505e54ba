"""AutoAttack: the sequence, its per-example worst case, its checks, and what is deployed.

The attacks themselves are checked in test_apgd.py, test_fab.py and test_square.py
(against ART and closed forms). Here a small AutoAttack (few steps, targets and queries)
keeps the tests short; the sequence logic is the same at full size.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from anp_vs_tf import attacks
from anp_vs_tf.metrics.autoattack import autoattack_evaluation

EPS = 0.15  # a standard LeNet keeps ~30% under PGD here: the stages have work to do
SMALL = dict(steps=20, queries=150, target_classes=3)


def small(**changes):
    return attacks.AutoAttack(EPS, **{**SMALL, **changes})


def predictions(model, x):
    return model.inference_logits(x).numpy().argmax(1)


@pytest.fixture(scope="module")
def batch(mnist_subset):
    _, _, x, y = mnist_subset
    return x[:100], y[:100]


@pytest.fixture(scope="module")
def staged(trained_lenet, batch):
    x, y = batch
    x_adv, robust = small().stages(trained_lenet.inference_logits, x, y, tf.constant([3, 4]))
    return x_adv.numpy(), robust.numpy()


def test_the_standard_and_rand_sequences_are_the_references():
    standard = attacks.AutoAttack(0.3)
    assert standard.names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    apgd_ce, apgd_t, fab_t, square = (a for _, a in standard.attacks)
    assert (apgd_ce.loss, apgd_ce.steps, apgd_ce.restarts, apgd_ce.targeted) == ("ce", 100, 1, False)
    assert (apgd_t.loss, apgd_t.targeted, apgd_t.target_classes) == ("dlr", True, 9)
    assert (fab_t.targeted, fab_t.target_classes, fab_t.steps) == (True, 9, 100)
    assert square.queries == 5000 and standard.eot_samples == 1
    rand = attacks.AutoAttack(0.3, version="rand")
    assert rand.names == ["apgd-ce", "apgd-dlr"] and rand.eot_samples == 20
    assert all(a.eot_samples == 20 for _, a in rand.attacks)


def test_robust_only_shrinks_stage_by_stage_and_starts_from_the_clean_prediction(trained_lenet, batch, staged):
    x, y = batch
    _, robust = staged
    assert robust.shape == (5, 100)
    np.testing.assert_array_equal(robust[0], predictions(trained_lenet, x) == y)
    assert (robust[1:] <= robust[:-1]).all()  # once fooled, never robust again
    assert robust[-1].sum() < robust[0].sum()


def test_the_result_is_the_worst_case_per_example(trained_lenet, batch, staged):
    x, y = batch
    x_adv, robust = staged
    fooled = predictions(trained_lenet, x_adv) != y
    np.testing.assert_array_equal(fooled, ~robust[-1])
    np.testing.assert_array_equal(x_adv[robust[-1]], x[robust[-1]])  # nothing found: x itself
    assert np.abs(x_adv - x).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_it_is_at_least_as_strong_as_each_attack_alone_and_pgd(trained_lenet, batch, staged):
    x, y = batch
    _, robust = staged
    logits = trained_lenet.inference_logits
    for name, attack in small().attacks:
        alone = (predictions(trained_lenet, attack(logits, x, y, tf.constant([5, 6]))) == y).mean()
        assert robust[-1].mean() <= alone + 0.02, name  # other seeds: within two examples
    pgd = attacks.PGD(EPS, EPS / 4, 40)
    assert robust[-1].mean() <= (predictions(trained_lenet, pgd(logits, x, y, tf.constant([1, 2]))) == y).mean()


def test_attacking_every_example_gives_the_same_robust_accuracy(trained_lenet, batch, staged):
    """only_robust=False is the XLA-friendly schedule: the same worst case, more work."""
    x, y = batch
    _, robust = staged
    _, dense = small(only_robust=False).stages(trained_lenet.inference_logits, x, y, tf.constant([3, 4]))
    assert abs(dense.numpy()[-1].mean() - robust[-1].mean()) <= 0.03
    np.testing.assert_array_equal(dense.numpy()[0], robust[0])


def test_the_dense_schedule_compiles_under_xla(trained_lenet, batch):
    x, y = batch
    aa = small(only_robust=False, skip=("fab-t", "square"), steps=5)
    run = tf.function(lambda x, y: aa.stages(trained_lenet.inference_logits, x, y, tf.constant([1, 1]))[1],
                      jit_compile=True)
    robust = run(tf.constant(x[:16]), tf.constant(y[:16])).numpy()
    assert robust.shape == (3, 16) and (robust[1:] <= robust[:-1]).all()


def test_evaluation_reports_stages_and_passes_the_checks(trained_lenet, mnist_subset):
    _, _, x, y = mnist_subset
    test = tf.data.Dataset.from_tensor_slices((x[:120], y[:120])).batch(50)
    result = autoattack_evaluation(trained_lenet, test, small(), examples=100, batch_size=40, verbose=0)
    after = result["aa_attack"]["robust_acc_after"]
    assert list(after) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert result["aa_attack"]["examples"] == 100 and result["aa_acc"] == after["square"]
    assert abs(after["clean"] - (predictions(trained_lenet, x[:100]) == y[:100]).mean()) < 1e-9
    sanity = result["sanity"]
    assert sanity["zero_gradient_examples"] == 0 and not sanity["logits_random"]
    assert sanity["examples"] == 100
    json.dumps(result)  # what metrics.json holds


def test_a_zero_gradient_model_is_flagged_and_square_still_breaks_it(trained_lenet, mnist_subset):
    """Gradient masking: APGD and FAB see no gradient, Square (no gradients) still succeeds."""
    _, _, x, y = mnist_subset

    def masked(images):
        return tf.stop_gradient(trained_lenet.inference_logits(images)) + 0.0 * images[:, :1, 0, 0]

    test = tf.data.Dataset.from_tensor_slices((x[:60], y[:60])).batch(60)
    result = autoattack_evaluation(masked, test, attacks.AutoAttack(0.3, steps=10, queries=300, target_classes=2),
                                   verbose=0)
    after, sanity = result["aa_attack"]["robust_acc_after"], result["sanity"]
    assert after["fab-t"] >= after["clean"] - 0.02  # the gradient attacks find nothing
    assert after["square"] < after["clean"] - 0.3
    assert sanity["zero_gradient_examples"] == 60 and sanity["square_extra_pct"] > 30
    assert not sanity["passed"]


def test_a_stochastic_network_is_flagged_as_random(mnist_subset):
    from anp_vs_tf import models
    from anp_vs_tf.trainers import RobustModel, get_method

    _, _, x, y = mnist_subset
    model = RobustModel(models.lenet5_caffe(prunable=True), get_method("anp_vs", num_train_examples=100),
                        adversary=attacks.PGD(0.1, 0.05, 1), seed=0)
    test = tf.data.Dataset.from_tensor_slices((x[:20], y[:20])).batch(20)
    aa = attacks.AutoAttack(0.1, steps=2, queries=5, target_classes=2, skip=("apgd-t", "fab-t"))
    assert autoattack_evaluation(model.stochastic_logits, test, aa, verbose=0)["sanity"]["logits_random"]
    assert not autoattack_evaluation(model, test, aa, verbose=0)["sanity"]["logits_random"]


def test_the_exported_saved_model_gives_the_same_autoattack_accuracy(trained_lenet, mnist_subset, tmp_path):
    """Evaluate what is deployed: the serving signature's logits are attacked alike."""
    from anp_vs_tf.export import export

    _, _, x, y = mnist_subset
    export(trained_lenet, str(tmp_path), version=1, verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "1"))  # kept: the signature needs its variables
    signature = loaded.signatures["serving_default"]
    test = tf.data.Dataset.from_tensor_slices((x[:60], y[:60])).batch(60)
    aa = small(skip=("square",))
    served = autoattack_evaluation(lambda images: signature(images=images)["logits"], test, aa, verbose=0)
    masked = autoattack_evaluation(trained_lenet, test, aa, verbose=0)
    assert abs(served["aa_acc"] - masked["aa_acc"]) <= 1 / 60
    assert served["aa_attack"]["robust_acc_after"]["clean"] == masked["aa_attack"]["robust_acc_after"]["clean"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(version="plus"), "version"),
    (dict(norm="l1"), "norm"),
    (dict(steps=0), "steps"),
    (dict(skip=("fab",)), "skip"),
    (dict(skip=("apgd-ce", "apgd-t", "fab-t", "square")), "no attack"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.AutoAttack(0.3, **kwargs)


def test_config_round_trip():
    aa = attacks.AutoAttack(0.1, norm="l2", version="rand", steps=7, skip=("apgd-dlr",))
    again = attacks.AutoAttack.from_config(aa.get_config())
    assert again.get_config() == aa.get_config() and again.names == ["apgd-ce"]


def test_eval_mode_writes_autoattack_to_metrics_json_and_the_report(trained_lenet, data_dir, tmp_path):
    from anp_vs_tf import experiment, report
    from anp_vs_tf.config import RunConfig

    path = tmp_path / "model.keras"
    trained_lenet.save(path)
    config = RunConfig(mode="eval", model_path=str(path), data_dir=str(data_dir), download=False, test_subset=60,
                       eval_pgd_steps=2, sanity_examples=0, fgsm=False, plots=False, autoattack="standard",
                       autoattack_examples=40, out_dir=str(tmp_path / "eval"), verbose=0).resolved()
    experiment.run(config)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    attack = metrics["aa_attack"]
    assert attack["examples"] == 40 and attack["version"] == "standard" and attack["eps"] == 0.3
    assert attack["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert 0 <= metrics["aa_acc"] <= metrics["pgd_acc"] + 0.05  # eps 0.3 breaks a standard LeNet
    assert "autoattack" in metrics["sanity"]
    table = report.format_table([("Standard", metrics)])
    assert "| AA |" in table and f"| {100 * metrics['aa_acc']:.2f} |" in table


def test_a_bad_autoattack_flag_is_refused_before_any_work():
    from anp_vs_tf.config import RunConfig
    from anp_vs_tf.errors import ConfigError

    with pytest.raises(ConfigError, match="autoattack"):
        RunConfig(autoattack="plus").resolved()
    with pytest.raises(ConfigError, match="autoattack_examples"):
        RunConfig(autoattack="standard", autoattack_examples=0).resolved()
