"""Accuracy and vulnerability of a model under one attack, over a whole data set."""


def attack_evaluation(model, dataset, adversary, verbose=0):
    """`model.evaluate` against `adversary`: clean and robust accuracy, vulnerability.

    The attack runs inside the model's compiled `test_step` (Keras' progress bar, any
    distribution strategy); the model's own eval adversary is restored afterwards.
    Returns a dict: acc, acc_adv, examples and, for a backbone with latent features,
    vulnerability (V), layer_vulnerability (one value per latent layer) and
    feature_vulnerability (one list of per-feature values per latent layer).
    """
    if not model.compiled:  # Keras' evaluate() insists; evaluation itself uses no optimizer
        model.compile()
    previous = model.eval_adversary
    model.set_eval_adversary(adversary)
    try:
        logs = model.evaluate(dataset, return_dict=True, verbose=verbose)
        result = {
            "acc": float(logs["acc"]),
            "acc_adv": float(logs["acc_adv"]),
            "examples": int(model.trackers["acc"].count.numpy()),
        }
        tracker = model.feature_vulnerability
        if tracker.units_per_layer:
            result["vulnerability"] = float(tracker.result().numpy())
            result["layer_vulnerability"] = [float(v) for v in tracker.per_layer().numpy()]
            result["feature_vulnerability"] = [
                [float(v) for v in layer.numpy()] for layer in tracker.per_feature()
            ]
    finally:
        model.set_eval_adversary(previous)
    return result
