"""What a run is made of, built from its `RunConfig`: data, model, attacks.

The command line's runs (`experiment`) and the hyperparameter search (`tuning`) build
their models here, so a tuning trial trains exactly the model the run it tunes would.
Library errors (ValueError) become `ConfigError`s that name the flag to change.
"""

import contextlib
import math

import keras

from anp_vs_tf import attacks, data, precision
from anp_vs_tf.config import ConfigError
from anp_vs_tf.models import build_model, check_input_shape, transfer_weights
from anp_vs_tf.models.zoo import RESIDUAL
from anp_vs_tf.trainers import RobustModel, get_method, load_robust_model, method_switches


def load_model_file(path, flag):
    """`trainers.load_robust_model(path)`, its refusal as a ConfigError naming `flag`."""
    try:
        return load_robust_model(path)
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}") from None


def learning_rate(base, config, steps_per_epoch, epochs):
    """The paper's staircase: x0.1 at each fraction of training in lr_decay_at."""
    total = steps_per_epoch * epochs
    boundaries = [int(f * total) for f in config.lr_decay_at]
    if not boundaries or total == 0:
        return base
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [base * 0.1**i for i in range(len(boundaries) + 1)]
    )


def build(config, info, method_name=None, init_from=None, epochs=None):
    """The compiled RobustModel a run trains, initialised from `init_from` if given.

    `epochs` (default config.epochs) is the length the learning-rate schedule spans.
    """
    method_name = method_name or config.method
    epochs = config.epochs if epochs is None else epochs
    method = get_method(
        method_name,
        adv_weight=config.adv_weight,
        beta_kl=config.beta_kl,
        kl_weighting=config.kl_weighting,
        # The target is the pruned model's: the base model a run pretrains has no masks.
        target_flops_speedup=config.target_flops_speedup if method_switches(method_name)["prunes"] else None,
        target_memory_pct=config.target_memory_pct if method_switches(method_name)["prunes"] else None,
        finetune_fraction=config.finetune_fraction,
        lambda_vs=config.lambda_vs,
        weight_decay=config.weight_decay,
        num_train_examples=info.num_train,
        beta_trades=config.beta_trades,
        weight_sparsity=config.weight_sparsity,
        admm_rho=config.admm_rho,
        admm_fraction=config.admm_fraction,
        bnn_kl_weight=config.bnn_kl_weight,
        bnn_samples=config.bnn_samples,
    )
    # The layers take the policy they are created under; the float32 default is left alone.
    mixed = precision.dtype_policy(precision.MIXED_POLICY) if config.mixed_precision else contextlib.nullcontext()
    with mixed:
        backbone = build_model(
            config.model,
            info.input_shape,
            info.num_classes,
            prunable=method.prunes,
            mask_kwargs=dict(a_init=config.mask_a_init, b_init=config.mask_b_init, seed=config.seed),
            bayesian_kwargs=(
                dict(prior_stddev=config.bnn_prior_stddev, init_rho=config.bnn_init_rho, seed=config.seed)
                if method.bayesian else None
            ),
            **(dict(groups=config.mask_groups) if config.model in RESIDUAL else {}),
        )
    if init_from is not None:
        base = load_model_file(init_from, "--init_from")
        try:
            transfer_weights(base.backbone, backbone)
        except ValueError as error:
            raise ConfigError(f"--init_from {init_from}: {error}") from None
    adversary = attacks.PGD(config.eps, config.step_size, config.pgd_steps) if method.adversarial else None
    model = RobustModel(backbone, method, adversary=adversary, seed=config.seed)
    steps_per_epoch = math.ceil(info.num_train / config.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(config.lr, config, steps_per_epoch, epochs)),
        mask_optimizer=(
            keras.optimizers.Adam(learning_rate(config.mask_lr, config, steps_per_epoch, epochs))
            if method.prunes else None
        ),
    )
    return model


def eval_attack(config):
    """The run's evaluation attack: PGD with the evaluation steps and step size."""
    return attacks.PGD(config.eps, config.eval_step_size, config.eval_pgd_steps)


def eval_autoattack(config):
    """The run's AutoAttack (--autoattack), or None."""
    if config.autoattack == "none":
        return None
    return attacks.AutoAttack(config.eps, version=config.autoattack)


def load_bb_source(config):
    """The black-box source model, checked before any work starts."""
    if config.bb_source is None:
        return None
    source = load_model_file(config.bb_source, "--bb_source")
    expected = tuple(source.backbone.input_shape[1:])
    spec = data.DATASETS.get(config.dataset)
    if getattr(spec, "input_shape", None) and tuple(spec.input_shape) != expected:
        raise ConfigError(
            f"--bb_source {config.bb_source} takes {'x'.join(map(str, expected))} images, "
            f"{config.dataset} has {'x'.join(map(str, spec.input_shape))}."
        )
    return source


def _check_model_fits(model_name, input_shape):
    try:
        check_input_shape(model_name, input_shape)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_data(config):
    """The run's data splits, after checking that its model takes the data's images."""
    spec = data.DATASETS.get(config.dataset)
    if getattr(spec, "input_shape", None):  # known without loading: fail before the work
        _check_model_fits(config.model, spec.input_shape)
    splits = data.load(
        config.dataset,
        data_dir=config.data_dir,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        train_subset=config.train_subset,
        test_subset=config.test_subset,
        seed=config.seed,
        download=config.download,
        on_bad_file=config.on_bad_file,
        validation_examples=config.validation_examples,
    )
    _check_model_fits(config.model, splits.info.input_shape)
    return splits
