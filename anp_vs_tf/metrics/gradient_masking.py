"""Checks that robust accuracy is real robustness, not gradient masking.

A model that hides its gradients (Athalye et al., 2018) looks robust to gradient
attacks without being robust. Carlini et al. (2019) list symptoms that are cheap to
test; these four are run on a slice of the test set and written into metrics.json:

    accuracy_falls_with_eps     robust accuracy does not rise as eps grows
    pgd_stronger_than_fgsm      the iterative attack is at least as strong as one step
    unbounded_attack_succeeds   with eps covering the whole input range, accuracy ~ 0
    more_steps_not_weaker       doubling the PGD steps does not weaken the attack

Each check is a pure function of the measured numbers (easy to test), and
`gradient_masking_checks` measures the numbers.
"""

from absl import logging
import tensorflow as tf

from anp_vs_tf.attacks.pgd import fgsm
from anp_vs_tf.metrics.robustness import attack_evaluation

# Accuracy differences within one point are attack noise (random starts), not a symptom.
TOLERANCE = 0.01
# "About zero": an unbounded attack leaves at most this accuracy.
UNBOUNDED_MAX_ACC = 0.02
EPS_FRACTIONS = (0.25, 0.5, 1.0, 2.0)


def accuracy_falls_with_eps(eps, acc, tolerance=TOLERANCE):
    rises = [later - earlier for earlier, later in zip(acc, acc[1:])]
    return {"passed": all(r <= tolerance for r in rises), "eps": list(eps), "acc": list(acc)}


def pgd_stronger_than_fgsm(pgd_acc, fgsm_acc, tolerance=TOLERANCE):
    return {"passed": pgd_acc <= fgsm_acc + tolerance, "pgd_acc": pgd_acc, "fgsm_acc": fgsm_acc}


def unbounded_attack_succeeds(eps, acc, max_acc=UNBOUNDED_MAX_ACC):
    return {"passed": acc <= max_acc, "eps": eps, "acc": acc}


def more_steps_not_weaker(steps, acc, tolerance=TOLERANCE):
    return {"passed": acc[1] <= acc[0] + tolerance, "steps": list(steps), "acc": list(acc)}


def _first_examples(dataset, examples, batch_size=500):
    """The first `examples` examples as a data set of known length: Keras' evaluate()
    warns that a data set of unknown length "ran out of data" when it ends."""
    first = next(iter(dataset.unbatch().batch(examples)), None)
    if first is None:
        raise ValueError("the gradient-masking checks got an empty data set; pass the test split.")
    return tf.data.Dataset.from_tensor_slices(first).batch(batch_size)


def gradient_masking_checks(model, dataset, adversary, examples=1000, verbose=0):
    """Run the four checks with `adversary`'s settings on the first `examples` examples.

    Returns {check name: {"passed": bool, numbers...}, "examples": n, "all_passed": bool}
    and logs a warning for every failed check.
    """
    data = _first_examples(dataset, examples)

    def robust_acc(attack):
        return attack_evaluation(model, data, attack, verbose=verbose)["acc_adv"]

    def pgd(eps, steps=adversary.steps, step_size=None):
        step_size = adversary.step_size * eps / adversary.eps if step_size is None else step_size
        return adversary.replace(eps=eps, steps=steps, step_size=step_size, restarts=1)

    eps_values = [adversary.eps * f for f in EPS_FRACTIONS]
    base = attack_evaluation(model, data, adversary, verbose=verbose)
    base_acc = base["acc_adv"]
    eps_acc = [base_acc if f == 1.0 else robust_acc(pgd(e)) for f, e in zip(EPS_FRACTIONS, eps_values)]
    fgsm_acc = robust_acc(fgsm(adversary.eps, adversary.clip_min, adversary.clip_max, norm=adversary.norm,
                               loss_fn=adversary.loss_fn, eot_samples=adversary.eot_samples,
                               chunks=adversary.chunks))
    full_range = adversary.clip_max - adversary.clip_min
    unbounded_acc = robust_acc(pgd(full_range, step_size=2.5 * full_range / max(adversary.steps, 1)))
    more_steps_acc = robust_acc(pgd(adversary.eps, steps=2 * adversary.steps, step_size=adversary.step_size))

    checks = {
        "accuracy_falls_with_eps": accuracy_falls_with_eps(eps_values, eps_acc),
        "pgd_stronger_than_fgsm": pgd_stronger_than_fgsm(base_acc, fgsm_acc),
        "unbounded_attack_succeeds": unbounded_attack_succeeds(full_range, unbounded_acc),
        "more_steps_not_weaker": more_steps_not_weaker(
            [adversary.steps, 2 * adversary.steps], [base_acc, more_steps_acc]
        ),
    }
    for name, check in checks.items():
        if not check["passed"]:
            numbers = {k: v for k, v in check.items() if k != "passed"}
            logging.warning("gradient-masking check %s failed: %s", name, numbers)
    return {**checks, "examples": base["examples"], "all_passed": all(c["passed"] for c in checks.values())}
