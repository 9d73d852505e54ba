"""What the paper reports for one model: accuracy, robustness, vulnerability, size.

`evaluate()` arranges the pieces that live elsewhere: the model's own `test_step`
(clean and adversarial accuracy, vulnerability, with Keras' progress bar and any
distribution strategy) and the layer walk of `metrics.complexity`.
"""

from anp_vs_tf.metrics.complexity import complexity
from anp_vs_tf.models.backbone import split_outputs


def latent_names(backbone):
    """Names of the layers whose outputs are the backbone's latent features."""
    _, latents = split_outputs(backbone.output)
    return [z._keras_history.operation.name for z in latents]


def attack_settings(adversary):
    """The settings of an attack, for metrics.json."""
    return {"name": type(adversary).__name__, **adversary.get_config()}


def evaluate(model, dataset, adversary, verbose=1):
    """Clean and white-box robust accuracy, vulnerability and complexity of `model`.

    Args:
        model: a `RobustModel`.
        dataset: batches of (image, label).
        adversary: the white-box attack, e.g. `attacks.PGD(0.3, 0.01, 40)`.
    Returns:
        a json-serializable dict: clean_acc, pgd_acc, vulnerability_wb,
        layer_vulnerability_wb, sparsity_pct, n_active, n_units, params_kept_pct,
        flops_speedup, memory_pct (and the raw counts), eval_attack, num_examples.
    """
    model.set_eval_adversary(adversary)
    logs = model.evaluate(dataset, return_dict=True, verbose=verbose)
    tracker = model.feature_vulnerability
    results = {
        "clean_acc": float(logs["acc"]),
        "pgd_acc": float(logs["acc_adv"]),
        "num_examples": int(tracker.count.numpy()),
        "eval_attack": attack_settings(adversary),
    }
    if tracker.units_per_layer:
        per_layer = [float(v) for v in tracker.per_layer().numpy()]
        results["vulnerability_wb"] = float(tracker.result().numpy())
        results["layer_vulnerability_wb"] = dict(zip(latent_names(model.backbone), per_layer))
    results.update(complexity(model.backbone).to_dict())
    return results
