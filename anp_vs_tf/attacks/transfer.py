"""Black-box transfer: adversarial examples crafted on another model, used on the target."""

from anp_vs_tf.models.backbone import split_outputs


class TransferAttack:
    """Runs `attack` against `source` whatever network it is asked to attack.

    With the target's `evaluate()`, this measures black-box robustness: x~ comes from a
    separately trained source model (any method), the accuracy and vulnerability from
    the target. The source is used as deployed (deterministic masks, moving statistics).
    """

    def __init__(self, source, attack):
        self.source = source
        self.attack = attack
        self.eot_samples = 1  # the target is never queried

    def source_logits(self, x):
        if hasattr(self.source, "inference_logits"):
            return self.source.inference_logits(x)
        return split_outputs(self.source(x, training=False))[0]

    def __call__(self, logits_fn, x, y, seed=None):
        del logits_fn  # black box: the target's gradients are not used
        return self.attack(self.source_logits, x, y, seed)

    def __repr__(self):
        return f"TransferAttack(source={getattr(self.source, 'name', self.source)!r}, attack={self.attack!r})"

    def get_config(self):
        return {"source": getattr(self.source, "name", str(self.source)), "attack": self.attack.get_config()}
