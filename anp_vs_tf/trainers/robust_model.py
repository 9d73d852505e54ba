"""`RobustModel`: a Keras model whose `train_step` is one step of a training method.

    batch (x, y) -> adversary(x, y) -> x~                         deterministic masks
                 -> backbone([x; x~], training=True)              one mask sample per pair
                 -> method.losses(...) -> loss, mask_loss         CE, KL, VS, weight decay
                 -> optimizer on the weights, mask_optimizer on the masks

It is an ordinary Keras model: `compile()` then `fit()`, `evaluate()`, `predict()`,
callbacks, `save()` and `keras.saving.load_model()` all work, and everything is
created under the active `tf.distribute` strategy.
"""

import random

import keras
import tensorflow as tf

from anp_vs_tf import distribute
from anp_vs_tf import kernels as kernel_choice
from anp_vs_tf import precision, seeds
from anp_vs_tf.losses import cross_entropy
from anp_vs_tf.layers import all_layers, beta_bernoulli_layers, gaussian_layers, sampling
from anp_vs_tf.metrics.unit_costs import kl_weights
from anp_vs_tf.metrics.vulnerability import FeatureVulnerability
from anp_vs_tf.models.backbone import split_outputs
from anp_vs_tf.models.folding import folded_logits
from anp_vs_tf.trainers.methods import Views, get_method


def _deserialize(config):
    return keras.saving.deserialize_keras_object(config) if isinstance(config, dict) else config


def _serialize(obj):
    return keras.saving.serialize_keras_object(obj) if obj is not None else None


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class RobustModel(keras.Model):
    """Trains `backbone` with `method` against `adversary`.

    Args:
        backbone: Keras model from images to {"logits": ..., "latents": [...]}.
        method: a `Method` or a method name ("standard", "bp", "at", "at_vs", "anp",
            "anp_vs"); see `anp_vs_tf.trainers.methods`.
        adversary: the attack used in training, e.g. `attacks.PGD(0.3, 0.01, 20)`.
        eval_adversary: if set, `evaluate()` also reports robust accuracy ("acc_adv")
            and the network vulnerability against this attack.
        fuse_views: forward x and x~ as one stacked batch (faster) or as two calls.
            "auto" fuses unless the backbone has BatchNormalization, so that batch
            statistics stay per view as in the authors' two separate passes.
        seed: seed of every random draw in training (attack starts, masks); each
            step's draws are keyed by (seed, step), so a resumed run repeats them.
        kernels: "auto" (default) lets each traced step pick the faster kernels measured
            for the device it runs on (`anp_vs_tf.kernels`: on some CPUs, rewrites of
            the attack's convolutions and concurrent attack chunks; on GPUs, TPUs and
            under XLA, Keras' own); "keras" uses plain Keras ops everywhere. The model's
            layers are the same either way.
    """

    def __init__(
        self,
        backbone,
        method="standard",
        adversary=None,
        eval_adversary=None,
        fuse_views="auto",
        seed=None,
        kernels="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kernels not in kernel_choice.SETTINGS:
            raise ValueError(f"kernels must be one of {kernel_choice.SETTINGS}, got {kernels!r}.")
        self.kernels = kernels
        self.backbone = backbone
        self.method = get_method(method)
        self.adversary = adversary
        self.eval_adversary = eval_adversary
        if fuse_views == "auto":
            fuse_views = not any(
                isinstance(l, keras.layers.BatchNormalization) for l in all_layers(backbone)
            )
        self.fuse_views = bool(fuse_views)
        # A concrete seed (drawn from Python's RNG, which keras.utils.set_random_seed
        # seeds) goes into the config, so a loaded model continues the same streams.
        self.seed = int(seed) if seed is not None else random.randint(0, 2**31 - 2)
        self._check_backbone()
        self._eval_seeds = keras.random.SeedGenerator(self.seed + 1)
        # The running means a step reports, by name; evaluate() reads them afterwards.
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in dict.fromkeys(self.method.terms + ("loss", "acc", "acc_adv"))
        }
        self.feature_vulnerability = FeatureVulnerability(self._latent_units())
        # Per mask layer, the weight of its units' KL: None for the paper's uniform KL.
        self.kl_weights = (kl_weights(backbone, self.method.kl_weighting)
                           if self.method.prunes and self.method.kl_weighting != "uniform" else None)
        # A target's multiplier presses on each unit by what it costs (trainers.compression).
        self.target_kl_weights = {t.kind: kl_weights(backbone, t.resource)
                                  for t in getattr(self.method, "targets", ())}
        self.mask_optimizer = None
        self._trains_masks = self.method.prunes
        # Variables a method keeps (ADMM's duals and masks), saved with the model.
        self.method_state = self.method.build(self) or {}
        # The backbone is a functional model and comes built; being built from the start
        # lets a loaded model create its optimizers' slots and restore them.
        self.built = True

    def _check_backbone(self):
        precision.check_supported(self.backbone)
        method = self.method
        if method.adversarial and self.adversary is None:
            raise ValueError(f"method {method.name!r} trains on adversarial examples: pass an adversary.")
        has_masks = bool(beta_bernoulli_layers(self.backbone))
        if method.prunes and not has_masks:
            raise ValueError(
                f"method {method.name!r} learns Beta-Bernoulli masks but the backbone has none; "
                "build it with prunable=True or add BetaBernoulliDropout layers."
            )
        if has_masks and not method.prunes:
            raise ValueError(
                f"method {method.name!r} does not train masks but the backbone has "
                "BetaBernoulliDropout layers; build it with prunable=False."
            )
        has_gaussian = bool(gaussian_layers(self.backbone))
        if method.bayesian != has_gaussian:
            raise ValueError(
                f"method {method.name!r} needs a backbone "
                + ("with" if method.bayesian else "without")
                + " Gaussian weights; build it with bayesian_kwargs="
                + ("{...}." if method.bayesian else "None.")
            )
        if method.suppress_vulnerability and not self._latent_units():
            raise ValueError(
                f"method {method.name!r} suppresses latent vulnerability but the backbone "
                "exposes no latent features; return {'logits': ..., 'latents': [...]}."
            )

    def _latent_units(self):
        try:
            outputs = self.backbone.output
        except (AttributeError, ValueError):
            return []
        _, latents = split_outputs(outputs)
        return [int(z.shape[-1]) for z in latents]

    # -- the network ---------------------------------------------------------------

    def call(self, inputs, training=False):
        return split_outputs(self.backbone(inputs, training=training))[0]

    def logits_and_latents(self, inputs, training=False):
        return split_outputs(self.backbone(inputs, training=training))

    def inference_logits(self, inputs):
        """Logits of the network as deployed (expected masks, moving BN statistics; the
        average over weight samples for a Bayesian method): what predictions, accuracy and
        white-box attacks use."""
        return self.method.inference_outputs(self, inputs)[0]

    def stochastic_logits(self, inputs):
        """Logits with freshly sampled masks, everything else as at inference."""
        with sampling(at_inference=True):
            return self.logits_and_latents(inputs, training=False)[0]

    @property
    def mask_layers(self):
        return beta_bernoulli_layers(self.backbone)

    @property
    def mask_variables(self):
        return [v for layer in self.mask_layers for v in layer.mask_variables]

    @property
    def weight_variables(self):
        """Every trainable variable that is not a mask parameter."""
        masks = {id(v) for v in self.mask_variables}
        return [v for v in self.backbone.trainable_variables if id(v) not in masks]

    def kl_divergence(self, weights="method"):
        """Total KL of the Beta-Bernoulli masks (zero for a backbone without them), each
        layer's weighted by the cost of its units if the method says so (`kl_weighting`),
        or by `weights` ({mask layer name: weight}, None for none) if given."""
        weights = self.kl_weights if weights == "method" else weights
        kls = [layer.kl_divergence() for layer in self.mask_layers]
        if weights is not None:
            kls = [weights[layer.name] * kl for layer, kl in zip(self.mask_layers, kls)]
        return tf.add_n(kls) if kls else tf.constant(0.0)

    @property
    def kernel_variables(self):
        """The conv and dense kernels: what weight decay and weight pruning act on."""
        return [v for v in self.weight_variables if v.path.endswith("kernel")]

    def kernel_l2(self):
        """sum(w^2)/2 over the kernels: what weight decay penalizes."""
        kernels = self.kernel_variables
        return tf.add_n([tf.nn.l2_loss(tf.cast(k, tf.float32)) for k in kernels]) if kernels else 0.0

    def weight_sparsity(self):
        """Percent of kernel weights that are exactly zero (unstructured pruning, e.g. ADMM)."""
        kernels = self.kernel_variables
        if not kernels:  # e.g. Gaussian layers, whose weights are distributions
            return tf.constant(0.0)
        zeros = tf.add_n([tf.reduce_sum(tf.cast(tf.equal(k, 0.0), tf.float32)) for k in kernels])
        return 100.0 * zeros / float(sum(int(tf.size(k)) for k in kernels))

    def sparsity(self):
        """Percent of prunable units switched off (0 without masks)."""
        layers = self.mask_layers
        if not layers:
            return tf.constant(0.0)
        active = tf.add_n([tf.cast(l.num_active(), tf.float32) for l in layers])
        return 100.0 * (1.0 - active / float(sum(l.units for l in layers)))

    # -- attacks -----------------------------------------------------------------------

    def step_seed(self, stream):
        """The stateless seed of one random stream in the current training step.

        Keyed by (seed, optimizer step, stream), so draws are reproducible and a run
        restored from a checkpoint repeats them. Every replica gets the same seed and
        keeps its rows of a global draw (`distribute.replica_rows`), so the draws do
        not depend on the number of replicas either, nor on XLA (`seeds.fold_in`).
        """
        step = seeds.int32_seed(self.optimizer.iterations)
        seed = tf.stack([tf.constant(self.seed, tf.int32), step])
        return seeds.fold_in(seed, stream)

    def attack(self, x, y, adversary=None, seed=None):
        """Adversarial examples against the deterministic network, or against the
        stochastic one (sampled masks) for an attack with expectation over transformation.

        Without a `seed`, the random start comes from the model's evaluation stream.
        The deterministic masks and batch norm are folded into the weights for the
        attack's steps (`models.folding`: the same logits, fewer passes per step), and
        the attack runs with the kernels `self.kernels` picks for the device.
        """
        adversary = adversary or self.adversary
        if seed is None:
            seed = seeds.int32_seed(self._eval_seeds.next())
        if getattr(adversary, "eot_samples", 1) > 1 and self.mask_layers:
            logits = self.stochastic_logits
        elif self.method.predicts_with_backbone:
            logits = folded_logits(self.backbone, self.kernels)
        else:
            logits = self.inference_logits
        with kernel_choice.use(self.kernels):
            return adversary(logits, x, y, seed)

    def forward_views(self, x, x_adv=None, seed=None):
        """Training-mode forward of x and x~ sharing one mask sample per example.

        `seed` keys the masks (see `layers.sampling`); None uses the layers' own
        seed generators.
        """
        if x_adv is None:
            with sampling(seed):
                return Views(*self.logits_and_latents(x, training=True))
        with sampling(seed, shared_batch_size=tf.shape(x)[0]):
            if self.fuse_views:
                logits, latents = self.logits_and_latents(tf.concat([x, x_adv], 0), training=True)
                halves = lambda t: tf.split(t, 2, axis=0)  # noqa: E731
                logits, logits_adv = halves(logits)
                pairs = [halves(z) for z in latents]
                return Views(logits, [p[0] for p in pairs], logits_adv, [p[1] for p in pairs])
            clean = self.logits_and_latents(x, training=True)
            adv = self.logits_and_latents(x_adv, training=True)
        return Views(clean[0], clean[1], adv[0], adv[1])

    # -- compile, train and test steps -----------------------------------------------

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Skip Keras' symbolic build: under MultiWorkerMirroredStrategy it reduces a
        distributed batch eagerly and fails (keras-team/keras#20585), and this model does
        not need it, having built its optimizers at compile time and its metrics in
        __init__."""
        if not (self.compiled and self.optimizer.built):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, callbacks=None, total_epochs=None, **kwargs):
        """`keras.Model.fit`, plus the callbacks the method itself needs (ADMM's schedule).

        total_epochs: the length of the whole run when this call trains only part of it
        (a resumed run finishing an interrupted epoch); method schedules use it.
        """
        self.planned_epochs = total_epochs if total_epochs is not None else kwargs.get("epochs", 1)
        # The method's callbacks come first, so that what they change at the end of an
        # epoch (a phase, a frozen mask, logged unit counts) is in that epoch's
        # checkpoint, logs, History and TensorBoard.
        callbacks = list(self.method.callbacks(self)) + list(callbacks or [])
        data = args[0] if args else kwargs.get("x")
        if isinstance(data, tf.data.Dataset):
            # Keras ignores `shuffle` for a data set (it comes shuffled, as ours do) but
            # warns about its default True on every call.
            kwargs.setdefault("shuffle", False)
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def compile(self, optimizer="adam", mask_optimizer=None, **kwargs):
        """Like `keras.Model.compile`, plus `mask_optimizer` for the Beta-Bernoulli masks.

        The loss comes from the method, so `loss=` is not accepted. A pruning method
        without an explicit mask_optimizer gets Adam(1e-2), the paper's setting.
        """
        if kwargs.get("loss") is not None:
            raise ValueError("RobustModel's loss comes from its method; do not pass loss= to compile().")
        super().compile(optimizer=optimizer, **kwargs)
        if self.method.prunes:
            self.mask_optimizer = keras.optimizers.get(
                mask_optimizer if mask_optimizer is not None else keras.optimizers.Adam(1e-2)
            )
        elif mask_optimizer is not None:
            raise ValueError(f"method {self.method.name!r} has no masks to optimize; drop mask_optimizer.")
        self._compile_settings = dict(optimizer=optimizer, mask_optimizer=self.mask_optimizer, **kwargs)
        # Create the optimizers' slots now, under the caller's strategy scope: created
        # lazily inside a replica's step they would belong to that replica alone.
        self.optimizer.build(self.weight_variables)
        if self.mask_optimizer is not None:
            self.mask_optimizer.build(self.mask_variables)

    def get_compile_config(self):
        if self.compiled and hasattr(self, "_compile_settings"):
            return keras.saving.serialize_keras_object(self._compile_settings)
        return {}

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))

    def _logs(self, names):
        return {n: self.trackers[n].result() for n in names}

    def masks_frozen(self):
        """Whether every mask layer is frozen (`BetaBernoulliDropout.freeze`): the masks are
        then fixed and only the weights train. Read eagerly, between steps."""
        layers = self.mask_layers
        return bool(layers) and all(bool(layer.is_frozen()) for layer in layers)

    def make_train_function(self, force=False):
        """Keras' compiled step, retraced when the masks have been frozen since the last
        trace, so that a frozen model's step no longer computes or applies mask updates."""
        trains_masks = self.method.prunes and not self.masks_frozen()
        if trains_masks != getattr(self, "_trains_masks", None):
            self._trains_masks = trains_masks
            force = True
        return super().make_train_function(force=force)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("RobustModel does not support sample weights.")
        x_adv = self.method.adversarial_examples(self, x, y, self.step_seed(_ATTACK_STREAM))
        # Gradients are summed over replicas, so each replica's share is 1/R.
        replica_share = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
        weights = self.weight_variables
        masks = self.mask_variables if self._trains_masks else []
        with tf.GradientTape(persistent=True) as tape:
            views = self.forward_views(x, x_adv, self.step_seed(_MASK_STREAM))
            terms = self.method.losses(self, views, y)
            weight_objective = terms["loss"] * replica_share
            mask_objective = terms["mask_loss"] * replica_share if masks and "mask_loss" in terms else None
        self.optimizer.apply(tape.gradient(weight_objective, weights), weights)
        if mask_objective is not None:
            self.mask_optimizer.apply(tape.gradient(mask_objective, masks), masks)
        del tape
        self.method.after_update(self)

        names = [n for n in self.method.terms if n in terms]
        for name in names:
            self.trackers[name].update_state(terms[name])
        names.append("acc")
        self.trackers["acc"].update_state(_correct(y, views.logits))
        if views.logits_adv is not None:
            names.append("acc_adv")
            self.trackers["acc_adv"].update_state(_correct(y, views.logits_adv))
        logs = self._logs(names)
        if self.mask_layers:
            logs["sparsity"] = self.sparsity()
        return distribute.step_logs_for_keras(logs)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits, latents = self.method.inference_outputs(self, x)
        self.trackers["loss"].update_state(cross_entropy(y, logits))
        self.trackers["acc"].update_state(_correct(y, logits))
        names = ["loss", "acc"]
        if self.eval_adversary is not None:
            x_adv = self.attack(x, y, self.eval_adversary)
            logits_adv, latents_adv = self.method.inference_outputs(self, x_adv)
            self.trackers["acc_adv"].update_state(_correct(y, logits_adv))
            names.append("acc_adv")
            if latents:
                self.feature_vulnerability.update_state(latents, latents_adv)
                logs = self._logs(names)
                logs["vulnerability"] = self.feature_vulnerability.result()
                return distribute.step_logs_for_keras(logs)
        return distribute.step_logs_for_keras(self._logs(names))

    @property
    def metrics(self):
        return list(self.trackers.values()) + [self.feature_vulnerability]

    def set_eval_adversary(self, adversary):
        """Change the attack `evaluate()` uses (None: clean accuracy only)."""
        self.eval_adversary = adversary
        self.test_function = None  # retrace test_step with the new attack

    # -- saving --------------------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=_serialize(self.backbone),
            method=_serialize(self.method),
            adversary=_serialize(self.adversary),
            eval_adversary=_serialize(self.eval_adversary),
            fuse_views=self.fuse_views,
            seed=self.seed,
            kernels=self.kernels,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("backbone", "method", "adversary", "eval_adversary"):
            config[key] = _deserialize(config.get(key))
        return cls(**config)


_ATTACK_STREAM, _MASK_STREAM = 1, 2


def _correct(y, logits):
    return tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
