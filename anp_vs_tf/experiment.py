"""A whole run, from a `RunConfig` to a directory of results, through the public API.

    out_dir/config.json      the resolved settings
    out_dir/base/            the pretrained base model, when --pretrain_epochs is set
    out_dir/backup/          Keras BackupAndRestore state: a killed run resumes from it
    out_dir/checkpoints/     the latest epoch's model (ModelCheckpoint)
    out_dir/logs/            TensorBoard
    out_dir/model.keras      the trained model
    out_dir/metrics.json     what `evaluation.evaluate` measured on the test set
    out_dir/plots/           the run's figures (`plots.write_run_plots`)

The CLI calls `run(config)`; the steps below are what a user's own script would do.
"""

import dataclasses
import json
import math
import os
import time
import zipfile

import keras

from anp_vs_tf import attacks, data, evaluation, report
from anp_vs_tf.config import ConfigError, RunConfig
from anp_vs_tf.models import build_model, check_input_shape, transfer_weights
from anp_vs_tf.trainers import RobustModel, get_method

_RESTART_KEYS = ("verbose", "overwrite", "download")


def _write_json(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)  # insertion order: layers stay in network order
    os.replace(tmp, path)


def check_out_dir(config):
    """Refuse an out_dir whose results this run would overwrite; writes nothing.

    A finished run (metrics.json present) is never overwritten unless --overwrite; an
    unfinished one with the same settings resumes; different settings are refused.
    """
    out = config.out_dir
    if config.overwrite:
        return
    if os.path.exists(os.path.join(out, "metrics.json")):
        raise ConfigError(
            f"{out} already holds a finished run (metrics.json); choose another --out_dir "
            "or pass --overwrite."
        )
    saved_path = os.path.join(out, "config.json")
    if os.path.exists(saved_path):
        try:
            with open(saved_path) as f:
                saved = _settings(json.load(f))
        except (OSError, ValueError):
            saved = None
        if saved != _settings(dataclasses.asdict(config)):
            raise ConfigError(
                f"{out} holds an unfinished run with different settings; resume it with the "
                "same flags, choose another --out_dir, or pass --overwrite."
            )


def _settings(config_dict):
    settings = {k: v for k, v in config_dict.items() if k not in _RESTART_KEYS}
    settings["lr_decay_at"] = list(settings.get("lr_decay_at") or [])
    return settings


def prepare_out_dir(config):
    """Create out_dir and record the settings (after every check has passed)."""
    os.makedirs(config.out_dir, exist_ok=True)
    _write_json(os.path.join(config.out_dir, "config.json"), dataclasses.asdict(config))
    return config.out_dir


def load_robust_model(path):
    """Load a model saved by this package, or raise ConfigError saying why it is not one."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is not a file; pass a .keras model saved by anp_vs_tf.")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not a .keras model file (the zip archive model.save() writes).")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # keras raises many kinds for a file that is not a model
        first = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} could not be loaded as a Keras model ({first}).") from None
    if not isinstance(model, RobustModel):
        raise ConfigError(f"{path} is a {type(model).__name__}, not an anp_vs_tf RobustModel.")
    return model


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
    )
    if init_from is not None:
        try:
            transfer_weights(load_robust_model(init_from).backbone, backbone)
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
    return attacks.PGD(config.eps, config.eval_step_size, config.eval_pgd_steps)


def measure(model, splits, config, out_dir, bb_source=None):
    """evaluation.evaluate with the run's settings, and the run's figures."""
    adversary = eval_attack(config)
    metrics = evaluation.evaluate(
        model, splits.test, adversary, fgsm_attack=config.fgsm, bb_source=bb_source,
        eot_samples=config.eot_samples, sanity_examples=config.sanity_examples, verbose=config.verbose,
    )
    if config.plots:
        from anp_vs_tf import plots  # matplotlib loads only when figures are drawn

        plots.write_run_plots(model, splits.test, adversary, out_dir, metrics=metrics)
    return metrics


def _load_bb_source(config):
    """The black-box source model, checked before any work starts."""
    if config.bb_source is None:
        return None
    source = load_robust_model(config.bb_source)
    expected = tuple(source.backbone.input_shape[1:])
    spec = data.DATASETS.get(config.dataset)
    if getattr(spec, "input_shape", None) and tuple(spec.input_shape) != expected:
        raise ConfigError(
            f"--bb_source {config.bb_source} takes {'x'.join(map(str, expected))} images, "
            f"{config.dataset} has {'x'.join(map(str, spec.input_shape))}."
        )
    return source


def fit(model, dataset, epochs, out_dir, validation=None, verbose=1):
    """model.fit with the run's callbacks: backup/resume, latest checkpoint, TensorBoard."""
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "checkpoints", "latest.keras")),
        keras.callbacks.TensorBoard(os.path.join(out_dir, "logs")),
    ]
    return model.fit(
        dataset, epochs=epochs, validation_data=validation, callbacks=callbacks, verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles, with the run's seed
    )


def train_and_evaluate(config, splits, out_dir, method_name=None, init_from=None, epochs=None,
                       bb_source=None):
    """Train one model into out_dir and measure it; returns its metrics."""
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    epochs = config.epochs if epochs is None else epochs
    model = build(config, splits.info, method_name, init_from, epochs)
    if epochs:
        fit(model, splits.train, epochs, out_dir, validation=splits.test, verbose=config.verbose)
    model.save(os.path.join(out_dir, "model.keras"))
    metrics = measure(model, splits, config, out_dir, bb_source)
    metrics.update(
        method=model.method.name,
        model=config.model,
        dataset=config.dataset,
        epochs=epochs,
        wall_time_s=time.time() - start,
    )
    _write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


def _check_model_fits(model_name, input_shape):
    try:
        check_input_shape(model_name, input_shape)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _load_data(config):
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
    )
    _check_model_fits(config.model, splits.info.input_shape)
    return splits


def run_train(config):
    """Train (after pretraining a base model if asked), evaluate, write metrics.json."""
    start = time.time()
    check_out_dir(config)
    if config.init_from is not None:
        base = load_robust_model(config.init_from)
        if base.backbone.name != config.model:
            raise ConfigError(
                f"--init_from {config.init_from} is a {base.backbone.name}, not a {config.model}."
            )
    bb_source = _load_bb_source(config)
    splits = _load_data(config)
    out = prepare_out_dir(config)
    keras.utils.set_random_seed(config.seed)
    rows = []
    init_from = config.init_from
    if config.pretrain_epochs:
        base_dir = os.path.join(out, "base")
        if os.path.exists(os.path.join(base_dir, "metrics.json")):
            with open(os.path.join(base_dir, "metrics.json")) as f:
                base_metrics = json.load(f)
        else:
            base_metrics = train_and_evaluate(
                config, splits, base_dir, method_name="standard", epochs=config.pretrain_epochs,
                bb_source=bb_source,
            )
        init_from = os.path.join(base_dir, "model.keras")
        rows.append((f"{report.PAPER_NAMES['standard']} (base)", base_metrics))
    metrics = train_and_evaluate(config, splits, out, init_from=init_from, bb_source=bb_source)
    metrics["wall_time_s"] = time.time() - start
    _write_json(os.path.join(out, "metrics.json"), metrics)
    rows.append((report.PAPER_NAMES.get(config.method, config.method), metrics))
    print(report.format_table(rows))
    return metrics


def run_eval(config):
    """Evaluate a saved model on the test set; writes out_dir/metrics.json."""
    start = time.time()
    model = load_robust_model(config.model_path)
    model_name = model.backbone.name
    config = dataclasses.replace(config, model=model_name)
    check_out_dir(config)
    bb_source = _load_bb_source(config)
    splits = _load_data(config)
    out = prepare_out_dir(config)
    metrics = measure(model, splits, config, out, bb_source)
    metrics.update(method=model.method.name, model=model_name, dataset=config.dataset,
                   model_path=config.model_path, wall_time_s=time.time() - start)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    print(report.format_table([(report.PAPER_NAMES.get(model.method.name, model.method.name), metrics)]))
    return metrics


def run(config: RunConfig):
    """Run `config` (mode train, eval or export) and return its metrics (export: its report)."""
    config = config.resolved()
    if config.mode == "export":
        from anp_vs_tf.export import export_file  # TF Serving export, only when asked

        return export_file(config.model_path, config.export_dir, config.version)
    return run_train(config) if config.mode == "train" else run_eval(config)
