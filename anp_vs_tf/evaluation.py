"""What the paper reports for one model: accuracy, robustness, vulnerability, size.

`evaluate()` arranges pieces that live elsewhere: attacks (`attacks`), the model's own
compiled `test_step` (accuracy and vulnerability under an attack, with Keras' progress
bar and any distribution strategy), the gradient-masking checks and the layer walk of
`metrics.complexity`. The result is the content of a run's metrics.json.
"""

from anp_vs_tf.attacks import TransferAttack, fgsm
from anp_vs_tf.metrics.autoattack import autoattack_evaluation
from anp_vs_tf.metrics.complexity import complexity
from anp_vs_tf.metrics.gradient_masking import gradient_masking_checks
from anp_vs_tf.metrics.robustness import attack_evaluation
from anp_vs_tf.models.backbone import latent_names
from anp_vs_tf.precision import float32_copy


def attack_settings(adversary):
    """The settings of an attack, for metrics.json."""
    return {"name": type(adversary).__name__, **adversary.get_config()}


def _vulnerability_entries(result, names, suffix):
    if "vulnerability" not in result:
        return {}
    return {
        f"vulnerability_{suffix}": result["vulnerability"],
        f"layer_vulnerability_{suffix}": dict(zip(names, result["layer_vulnerability"])),
        f"feature_vulnerability_{suffix}": dict(zip(names, result["feature_vulnerability"])),
    }


def evaluate(model, dataset, adversary, fgsm_attack=True, bb_source=None, eot_samples=0,
             sanity_examples=1000, autoattack=None, autoattack_examples=None, verbose=1):
    """Everything metrics.json reports about `model` on `dataset`.

    Args:
        model: a `RobustModel`.
        dataset: batches of (image, label), e.g. the test split.
        adversary: the white-box attack, e.g. `attacks.PGD(0.3, 0.01, 40)`.
        fgsm_attack: also measure FGSM accuracy at the same eps ("fgsm_acc").
        bb_source: a separately trained model; the same attack crafted on it and
            transferred gives "bb_acc" and "vulnerability_bb" (black box).
        eot_samples: if > 1 and the model has masks, PGD with expectation over this
            many mask samples attacks the stochastic network ("eot_acc").
        sanity_examples: run the gradient-masking checks on this many examples (0: skip).
        autoattack: an `attacks.AutoAttack` to also measure ("aa_acc", "aa_attack" and
            its checks in sanity["autoattack"]), on the first `autoattack_examples`
            examples (None: all).
    Returns:
        a json-serializable dict: clean_acc, pgd_acc, fgsm_acc, bb_acc, eot_acc,
        vulnerability_{wb,bb} with per-layer and per-feature values, sanity checks,
        the complexity figures (sparsity_pct, n_active, params_kept_pct, memory_pct,
        flops_speedup, raw counts), the attack settings and the number of examples.

    A model trained in mixed precision is measured as its float32 copy (see
    `anp_vs_tf.precision`), and so is the black-box source.
    """
    model = float32_copy(model)
    bb_source = float32_copy(bb_source) if bb_source is not None else None
    names = latent_names(model.backbone)
    white_box = attack_evaluation(model, dataset, adversary, verbose=verbose)
    metrics = {
        "clean_acc": white_box["acc"],
        "pgd_acc": white_box["acc_adv"],
        "num_examples": white_box["examples"],
        "eval_attack": attack_settings(adversary),
        **_vulnerability_entries(white_box, names, "wb"),
    }
    if fgsm_attack:
        one_step = fgsm(adversary.eps, adversary.clip_min, adversary.clip_max)
        metrics["fgsm_acc"] = attack_evaluation(model, dataset, one_step, verbose=verbose)["acc_adv"]
    if bb_source is not None:
        transfer = TransferAttack(bb_source, adversary)
        black_box = attack_evaluation(model, dataset, transfer, verbose=verbose)
        metrics["bb_acc"] = black_box["acc_adv"]
        metrics["bb_attack"] = attack_settings(transfer)
        metrics.update(_vulnerability_entries(black_box, names, "bb"))
    if eot_samples > 1 and model.mask_layers:
        eot = adversary.replace(eot_samples=eot_samples)
        metrics["eot_acc"] = attack_evaluation(model, dataset, eot, verbose=verbose)["acc_adv"]
        metrics["eot_attack"] = attack_settings(eot)
    if sanity_examples:
        metrics["sanity"] = gradient_masking_checks(model, dataset, adversary, sanity_examples)
    if autoattack is not None:
        result = autoattack_evaluation(model, dataset, autoattack, examples=autoattack_examples, verbose=verbose)
        metrics.update(aa_acc=result["aa_acc"], aa_attack=result["aa_attack"])
        metrics.setdefault("sanity", {})["autoattack"] = result["sanity"]
    metrics.update(complexity(model.backbone).to_dict())
    metrics["weight_sparsity_pct"] = float(model.weight_sparsity())
    metrics["pruning"] = (
        "weights" if model.method.prunes_weights else "units" if model.mask_layers else "none"
    )
    return metrics
