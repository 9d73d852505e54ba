"""AutoAttack (Croce & Hein, ICML 2020): a fixed sequence of diverse, parameter-free attacks.

Robust accuracy under AutoAttack is the per-example worst case over the sequence: each
attack runs only on the examples every earlier one failed on, and an example counts as
robust only if it survives them all. The standard version (L-infinity or L2) is
APGD-CE, APGD-T (targeted DLR, top 9 classes), FAB-T (targeted minimum norm, top 9)
and Square (5,000 queries, no gradients: what catches gradient masking); the "rand"
version, for a stochastic network, is APGD-CE and APGD-DLR with the gradient averaged
over 20 draws (expectation over transformation). The settings are the reference's,
fra31/auto-attack, autoattack/autoattack.py `set_version`.

The same contract as every attack of the package, `attack(logits_fn, x, y, seed) ->
x_adv`, so `metrics.attack_evaluation` and `RobustModel.attack` take it as they take
PGD (a "rand" AutoAttack has `eot_samples` 20, so a model with masks is attacked with
freshly sampled masks). `stages` also returns which examples were still robust after
each attack, what `metrics.autoattack` reports.
"""

import keras
import tensorflow as tf

from anp_vs_tf import seeds
from anp_vs_tf.attacks.apgd import APGD
from anp_vs_tf.attacks.fab import FAB
from anp_vs_tf.attacks.pgd import NORMS
from anp_vs_tf.attacks.square import Square

VERSIONS = ("standard", "rand")
RAND_EOT_SAMPLES = 20


def _correct(logits_fn, x, y, eot_samples):
    """Which examples `logits_fn` classifies correctly (on the mean logits of
    `eot_samples` calls, for a stochastic network)."""
    logits = logits_fn(x)
    for _ in range(eot_samples - 1):
        logits = logits + logits_fn(x)
    return tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.cast(y, tf.int32))


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class AutoAttack:
    """The standard or rand AutoAttack at radius `eps`.

    Args:
        eps: radius of the perturbation ball.
        norm: "linf" or "l2".
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square) or "rand" (APGD-CE and
            APGD-DLR with expectation over `eot_samples` draws).
        steps: iterations of APGD and FAB (100 in the reference).
        queries: Square's query budget (5,000).
        target_classes: the target classes of APGD-T and FAB-T (9).
        eot_samples: draws per gradient in the rand version (20). There an example
            counts as correct on the mean logits of as many draws (the reference looks
            at one draw, which counts a lucky draw as a success of the attack).
        only_robust: True attacks, at each stage, only the examples still robust (the
            reference's schedule, and the fastest); the batch then has a size known only
            when the graph runs, which XLA does not compile. False attacks every example
            at every stage and keeps a result only where it is the first to succeed:
            the same robust accuracy, under XLA too, at the cost of the full batch.
        clip_min, clip_max: the valid input range.
        skip: names of the version's attacks to leave out, e.g. ("fab-t",) to compare
            with a library that has no FAB (the result is then not AutoAttack's).
    """

    def __init__(self, eps, norm="linf", version="standard", steps=100, queries=5000, target_classes=9,
                 eot_samples=RAND_EOT_SAMPLES, only_robust=True, clip_min=0.0, clip_max=1.0, skip=()):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}.")
        for name, value in (("steps", steps), ("queries", queries), ("target_classes", target_classes),
                            ("eot_samples", eot_samples)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        self.eps = float(eps)
        self.norm = norm
        self.version = version
        self.steps = int(steps)
        self.queries = int(queries)
        self.target_classes = int(target_classes)
        self.rand_eot_samples = int(eot_samples)
        self.only_robust = bool(only_robust)
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        sequence = self._sequence()
        unknown = sorted(set(skip) - {name for name, _ in sequence})
        if unknown:
            raise ValueError(f"skip names attacks the {version} version does not run: {unknown}; "
                             f"it runs {[name for name, _ in sequence]}.")
        if len(set(skip)) == len(sequence):
            raise ValueError("skip leaves no attack to run.")
        self.skip = tuple(skip)
        self.attacks = [(name, attack) for name, attack in sequence if name not in self.skip]

    def _sequence(self):
        """The (name, attack) pairs of the version, in the order they run."""
        shared = dict(norm=self.norm, clip_min=self.clip_min, clip_max=self.clip_max)
        if self.version == "rand":
            eot = dict(steps=self.steps, eot_samples=self.rand_eot_samples, **shared)
            return [("apgd-ce", APGD(self.eps, loss="ce", **eot)),
                    ("apgd-dlr", APGD(self.eps, loss="dlr", **eot))]
        targets = dict(targeted=True, target_classes=self.target_classes)
        return [
            ("apgd-ce", APGD(self.eps, self.steps, loss="ce", **shared)),
            ("apgd-t", APGD(self.eps, self.steps, loss="dlr", **targets, **shared)),
            ("fab-t", FAB(self.eps, self.steps, **targets, **shared)),
            ("square", Square(self.eps, self.queries, **shared)),
        ]

    @property
    def names(self):
        return [name for name, _ in self.attacks]

    @property
    def eot_samples(self):
        """Draws per gradient: above 1, `RobustModel.attack` attacks the sampled network."""
        return self.rand_eot_samples if self.version == "rand" else 1

    def __repr__(self):
        return (f"AutoAttack(eps={self.eps}, norm={self.norm!r}, version={self.version!r}, "
                f"attacks={self.names})")

    def __call__(self, logits_fn, x, y, seed=None):
        """The worst case per example over the sequence (x itself where none succeeds)."""
        return self.stages(logits_fn, x, y, seed)[0]

    def stages(self, logits_fn, x, y, seed=None):
        """(x_adv, robust): robust[k] says which examples were classified correctly
        after the first k attacks, shape [len(attacks) + 1, batch] (robust[0]: clean)."""
        x = tf.convert_to_tensor(x)
        y = tf.cast(y, tf.int32)
        attack_seeds = seeds.split(seeds.attack_seed(seed), len(self.attacks))
        check = self.eot_samples
        if x.shape[0] == 0:
            return tf.identity(x), tf.zeros([len(self.attacks) + 1, 0], tf.bool)
        robust = _correct(logits_fn, x, y, check)
        history = [robust]
        x_adv = x
        for k, (_, attack) in enumerate(self.attacks):
            if self.only_robust:
                rows = tf.where(robust)[:, 0]

                def attack_rows(attack=attack, rows=rows, seed=attack_seeds[k]):
                    candidate = attack(logits_fn, tf.gather(x, rows), tf.gather(y, rows), seed)
                    fooled = tf.logical_not(_correct(logits_fn, candidate, tf.gather(y, rows), check))
                    return tf.boolean_mask(rows, fooled), tf.boolean_mask(candidate, fooled)

                # No network call on an empty batch (oneDNN's kernels fail on one; see PGD).
                hit, found = tf.cond(tf.size(rows) > 0, attack_rows, lambda: (rows, x[:0]))
                x_adv = tf.tensor_scatter_nd_update(x_adv, hit[:, None], found)
                robust = tf.tensor_scatter_nd_update(robust, hit[:, None], tf.zeros_like(hit, tf.bool))
            else:
                candidate = attack(logits_fn, x, y, attack_seeds[k])
                first = tf.logical_and(robust, tf.logical_not(_correct(logits_fn, candidate, y, check)))
                x_adv = tf.where(tf.reshape(first, [-1] + [1] * (len(x.shape) - 1)), candidate, x_adv)
                robust = tf.logical_and(robust, tf.logical_not(first))
            history.append(robust)
        return x_adv, tf.stack(history)

    def get_config(self):
        return dict(eps=self.eps, norm=self.norm, version=self.version, steps=self.steps, queries=self.queries,
                    target_classes=self.target_classes, eot_samples=self.rand_eot_samples,
                    only_robust=self.only_robust, clip_min=self.clip_min, clip_max=self.clip_max,
                    skip=list(self.skip))

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def replace(self, **changes):
        return AutoAttack(**{**self.get_config(), **changes})
