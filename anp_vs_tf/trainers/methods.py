"""Training methods: which examples a step needs and which losses it minimizes.

Every method of the paper is the same step with different switches:

    method    attack  masks  VS     weight loss
    standard    -       -     -     CE(x)
    bp          -       x     -     CE(x) + beta KL/N
    at          x       -     -     (CE(x) + w CE(x~)) / (1 + w)
    at_vs       x       -     x     ... + lambda V(x, x~)
    anp         x       x     -     (CE(x) + w CE(x~)) / (1 + w) + beta KL/N
    anp_vs      x       x     x     ... + lambda V(x, x~)
    pre_at      x       -     -     as at, started from a pretrained standard model

and, for the methods with masks, a mask loss of CE(x~) (CE(x) for bp) + beta KL/N
that only the Beta-Bernoulli parameters follow. Every loss also carries L2 weight
decay on the kernels. A method that needs more subclasses `Method`, overrides the
hooks it needs (`adversarial_examples`, `losses`, `after_update`, `callbacks`,
`inference_outputs`) and registers itself with `register` (see trades.py, admm.py,
adv_bnn.py next to this file; its Gaussian-weight layers are in layers/bayesian.py).
"""

import inspect

import keras
import tensorflow as tf

from anp_vs_tf.losses import cross_entropy
from anp_vs_tf.metrics.unit_costs import KL_WEIGHTINGS
from anp_vs_tf.trainers.compression import CompressionSchedule, PruningMonitor, Target
from anp_vs_tf.metrics.vulnerability import network_vulnerability

# name -> (class, the switches that make it that method); see `register`.
REGISTRY = {}


def register(name, cls=None, **switches):
    """Make `get_method(name)` build `cls` (default Method) with these switches."""
    REGISTRY[name] = (cls or Method, switches)


def mean_cross_entropy(labels, logits):
    """The batch's mean of `losses.cross_entropy`: the loss term of every method."""
    return tf.reduce_mean(cross_entropy(labels, logits))


class Views:
    """A training-mode forward pass of the clean batch and, if any, its adversarial copy."""

    def __init__(self, logits, latents, logits_adv=None, latents_adv=None):
        self.logits = logits
        self.latents = latents
        self.logits_adv = logits_adv
        self.latents_adv = latents_adv


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class Method:
    """One training method: switches plus the hyperparameters of its losses.

    Args:
        name: the method's name (one registered with `register`, listed by `method_names()`).
        adversarial: train on adversarial examples from the model's adversary.
        prunes: learn Beta-Bernoulli masks with the mask optimizer.
        suppress_vulnerability: add lambda_vs * V(x, x~) to the weight loss.
        adv_weight: w in (CE(x) + w CE(x~)) / (1 + w).
        beta_kl: beta, the weight of the KL of the masks per training example.
        kl_weighting: "uniform" (the paper's: every unit's KL alike), or "flops",
            "params", "memory": each unit's KL weighted by what it costs the deployed
            network (`metrics.unit_costs.kl_weights`), the same total pressure.
        lambda_vs: lambda, the weight of the vulnerability suppression loss.
        weight_decay: coefficient of sum(w^2)/2 over the kernels.
        num_train_examples: N, the training-set size that scales the KL (needed to prune).
        bayesian: the backbone's weights are Gaussian (`layers.GaussianDense`, ...).
        needs_pretrained: the method starts from a trained standard model (pre_at).
        target_flops_speedup: for a method with masks, prune to at least this many times
            fewer FLOPs: the KL's weight adapts until the network is there, then the
            masks are frozen and the weights fine-tuned (`trainers.compression`).
        target_memory_pct: the same for memory: at most this percentage of the dense
            network's params plus activations (`Complexity.memory_pct`).
        finetune_fraction: with a target, the fraction of the epochs that fine-tunes the
            frozen network.
    """

    # The loss terms a step may report; RobustModel keeps a running mean of each.
    terms = ("loss", "mask_loss", "ce", "ce_adv", "kl", "vulnerability")
    # Whether the method zeroes single weights (reported as weight sparsity).
    prunes_weights = False

    def __init__(
        self,
        name="standard",
        adversarial=False,
        prunes=False,
        suppress_vulnerability=False,
        adv_weight=2.0,
        beta_kl=1.0,
        kl_weighting="uniform",
        lambda_vs=0.0,
        weight_decay=1e-4,
        num_train_examples=None,
        bayesian=False,
        needs_pretrained=False,
        target_flops_speedup=None,
        target_memory_pct=None,
        finetune_fraction=0.3,
    ):
        for field, value in (("adv_weight", adv_weight), ("beta_kl", beta_kl),
                             ("lambda_vs", lambda_vs), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{field} must be >= 0, got {value}.")
        if kl_weighting not in KL_WEIGHTINGS:
            raise ValueError(f"kl_weighting must be one of {KL_WEIGHTINGS}, got {kl_weighting!r}.")
        if prunes and not (num_train_examples and num_train_examples > 0):
            raise ValueError(
                f"method {name!r} prunes, so it needs num_train_examples (the training-set "
                "size N that scales the KL term beta * KL / N)."
            )
        for field, value in (("target_flops_speedup", target_flops_speedup), ("target_memory_pct", target_memory_pct)):
            if value is not None and not prunes:
                raise ValueError(f"method {name!r} has no masks to prune to {field}; use bp, anp or anp_vs.")
        if target_flops_speedup is not None and not target_flops_speedup > 1:
            raise ValueError(f"target_flops_speedup must be > 1 (times fewer FLOPs), got {target_flops_speedup}.")
        if target_memory_pct is not None and not 0 < target_memory_pct < 100:
            raise ValueError(f"target_memory_pct must be in (0, 100) (% of the dense network), got {target_memory_pct}.")
        if not 0 <= finetune_fraction < 1:
            raise ValueError(f"finetune_fraction must be in [0, 1), got {finetune_fraction}.")
        self.name = name
        self.adversarial = bool(adversarial)
        self.prunes = bool(prunes)
        self.suppress_vulnerability = bool(suppress_vulnerability)
        self.adv_weight = float(adv_weight)
        self.beta_kl = float(beta_kl)
        self.kl_weighting = kl_weighting
        self.lambda_vs = float(lambda_vs)
        self.weight_decay = float(weight_decay)
        self.num_train_examples = num_train_examples
        self.bayesian = bool(bayesian)
        self.needs_pretrained = bool(needs_pretrained)
        self.target_flops_speedup = float(target_flops_speedup) if target_flops_speedup is not None else None
        self.target_memory_pct = float(target_memory_pct) if target_memory_pct is not None else None
        self.finetune_fraction = float(finetune_fraction)

    @property
    def targets(self):
        """The budgets this method prunes to (`trainers.compression.Target`), FLOPs first."""
        return [Target(kind, value) for kind, value in
                (("flops", self.target_flops_speedup), ("memory", self.target_memory_pct)) if value is not None]

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    # -- hooks a subclass may override ---------------------------------------------------

    def build(self, model):
        """Create any state the method keeps (variables), under the model's strategy scope.

        A target keeps its KL multiplier (`trainers.compression`)."""
        return {t.multiplier_name: keras.Variable(1.0, trainable=False, dtype="float32", name=t.multiplier_name)
                for t in self.targets}

    def callbacks(self, model):
        """Keras callbacks the method needs during `fit` (RobustModel.fit adds them): with
        masks, the per-epoch unit counts, and the schedule of the targets."""
        if not self.prunes:
            return []
        schedule = [CompressionSchedule(self, model)] if self.targets else []
        return schedule + [PruningMonitor(model)]

    def kl_penalty(self, model, kl):
        """beta KL / N; per target, plus (m - 1) beta KL_cost / N, its multiplier m's pressure
        on each unit in proportion to what the unit costs (`trainers.compression`)."""
        n = float(self.num_train_examples)
        penalty = self.beta_kl * kl / n  # the paper's, the same float32 number as before targets
        for target in self.targets:
            extra = tf.convert_to_tensor(model.method_state[target.multiplier_name]) - 1.0
            penalty += extra * self.beta_kl * model.kl_divergence(model.target_kl_weights[target.kind]) / n
        return penalty

    def after_update(self, model):
        """Runs in the compiled step after both optimizers have applied their updates."""

    def inference_outputs(self, model, x):
        """(logits, latents) the method predicts with; white-box attacks differentiate the logits."""
        return model.logits_and_latents(x, training=False)

    @property
    def predicts_with_backbone(self):
        """Whether inference is the backbone's own deterministic forward (not overridden),
        which an attack may run with masks and batch norm folded into the weights."""
        return type(self).inference_outputs is Method.inference_outputs

    def adversarial_examples(self, model, x, y, seed=None):
        """x~ for this batch, or None for a method that trains on clean data only."""
        if not self.adversarial:
            return None
        return model.attack(x, y, seed=seed)

    def losses(self, model, views, y):
        """The step's objectives and the terms worth logging.

        Returns a dict with "loss" (what the weights minimize), "mask_loss" (what the
        Beta-Bernoulli parameters minimize; absent unless the method prunes) and the
        components "ce", "ce_adv", "kl", "vulnerability" when they apply.
        """
        terms, classification = self.classification_loss(views, y)
        regularizer = self.weight_decay * model.kernel_l2()
        if self.prunes:
            terms["kl"] = model.kl_divergence()
            regularizer += self.kl_penalty(model, terms["kl"])
        loss = classification + regularizer
        if views.latents_adv is not None and views.latents:
            terms["vulnerability"] = network_vulnerability(views.latents, views.latents_adv)
            if self.suppress_vulnerability:
                loss += self.lambda_vs * terms["vulnerability"]
        terms["loss"] = loss
        if self.prunes:
            # Masks learn on the adversarial loss: they prune what the attack exploits.
            mask_ce = terms.get("ce_adv", terms["ce"])
            terms["mask_loss"] = mask_ce + regularizer
        return terms

    def classification_loss(self, views, y):
        """(terms, loss): CE(x), or (CE(x) + w CE(x~)) / (1 + w) with an adversarial view."""
        terms = {"ce": mean_cross_entropy(y, views.logits)}
        if views.logits_adv is None:
            return terms, terms["ce"]
        terms["ce_adv"] = mean_cross_entropy(y, views.logits_adv)
        w = self.adv_weight
        return terms, (terms["ce"] + w * terms["ce_adv"]) / (1.0 + w)

    def get_config(self):
        return dict(
            name=self.name,
            adversarial=self.adversarial,
            prunes=self.prunes,
            suppress_vulnerability=self.suppress_vulnerability,
            adv_weight=self.adv_weight,
            beta_kl=self.beta_kl,
            kl_weighting=self.kl_weighting,
            lambda_vs=self.lambda_vs,
            weight_decay=self.weight_decay,
            num_train_examples=self.num_train_examples,
            bayesian=self.bayesian,
            needs_pretrained=self.needs_pretrained,
            target_flops_speedup=self.target_flops_speedup,
            target_memory_pct=self.target_memory_pct,
            finetune_fraction=self.finetune_fraction,
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)


register("standard")
register("bp", prunes=True)
register("at", adversarial=True)
register("at_vs", adversarial=True, suppress_vulnerability=True)
register("anp", adversarial=True, prunes=True)
register("anp_vs", adversarial=True, prunes=True, suppress_vulnerability=True)
register("pre_at", adversarial=True, needs_pretrained=True)


def method_names():
    """Every registered method name, in registration order."""
    return list(REGISTRY)


def method_switches(name):
    """The switches of a registered method (adversarial, prunes, bayesian, ...)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}.")
    cls, switches = REGISTRY[name]
    defaults = {k: p.default for k, p in inspect.signature(Method).parameters.items()}
    return {**defaults, **switches}


def get_method(name, **hyperparameters):
    """The method called `name` with the given hyperparameters.

    Hyperparameters a method does not take are ignored, so one set of settings (the
    CLI's) serves every method.
    """
    if isinstance(name, Method):
        return name
    method_switches(name)  # unknown names fail here, with the list of choices
    cls, switches = REGISTRY[name]
    accepted = set(inspect.signature(cls).parameters) | set(inspect.signature(Method).parameters)
    options = {k: v for k, v in hyperparameters.items() if k in accepted}
    return cls(name=name, **switches, **options)
