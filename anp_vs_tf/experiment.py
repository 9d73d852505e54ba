"""A whole run, from a `RunConfig` to a directory of results, through the public API.

    out_dir/config.json      the resolved settings
    out_dir/base/            the pretrained base model, when --pretrain_epochs is set
    out_dir/checkpoints/     the training state, every epoch and on demand: a killed run
                             restarted with the same command resumes exactly
    out_dir/logs/            TensorBoard
    out_dir/model.keras      the trained model
    out_dir/metrics.json     what `evaluation.evaluate` measured on the test set
    out_dir/plots/           the run's figures (`plots.write_run_plots`)

The CLI calls `run(config)`; the steps below are what a user's own script would do.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import zipfile

import keras

from anp_vs_tf import attacks, checkpointing, data, distribute, evaluation, precision, report
from anp_vs_tf.config import ConfigError, RunConfig
from anp_vs_tf.models import build_model, check_input_shape, transfer_weights
from anp_vs_tf.trainers import RobustModel, get_method

# Settings a restarted run may change (how it runs, not what it computes).
_RESTART_KEYS = ("verbose", "overwrite", "download", "strategy", "devices", "eval_batch_size",
                 "max_trials")  # a search may be resumed with more trials


class Interrupted(RuntimeError):
    """Training stopped on request (SIGTERM) after saving a checkpoint."""


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
            with open(saved_path) as f:  # settings added since that run was started take their default
                saved = _settings({**dataclasses.asdict(RunConfig()), **json.load(f)})
        except (OSError, ValueError):
            saved = None
        if saved != _settings(dataclasses.asdict(config)):
            raise ConfigError(
                f"{out} holds an unfinished run with different settings; resume it with the "
                "same flags, choose another --out_dir, or pass --overwrite."
            )


def _settings(config_dict):
    settings = {k: v for k, v in config_dict.items() if k not in _RESTART_KEYS}
    for key in ("lr_decay_at", "devices"):  # tuples come back from JSON as lists
        settings[key] = list(settings.get(key) or [])
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
    """evaluation.evaluate with the run's settings, and the run's figures, in float32."""
    model = precision.float32_copy(model)
    adversary = eval_attack(config)
    metrics = evaluation.evaluate(
        model, splits.test, adversary, fgsm_attack=config.fgsm, bb_source=bb_source,
        eot_samples=config.eot_samples, sanity_examples=config.sanity_examples, verbose=config.verbose,
    )
    if config.plots and distribute.is_chief():
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


def fit(model, splits, epochs, batch_size, out_dir, verbose=1):
    """Train `model` for `epochs` epochs in total, resuming from out_dir's checkpoints.

    The data is the resumable stream `splits.train_from(step)`: a run restored at step
    s trains on exactly the batches an uninterrupted run would, so a kill at any point
    costs at most the work since the last checkpoint (every epoch, or on SIGUSR1 or
    SIGTERM; see `checkpointing`). Raises Interrupted after a SIGTERM checkpoint and
    TrainingDiverged if the loss turns NaN.
    """
    chief = distribute.is_chief()
    shared = os.path.join(out_dir, "checkpoints")
    directory = shared if chief else tempfile.mkdtemp(prefix="anp_vs_tf_worker_")
    state = checkpointing.TrainingState(model, directory, restore_from=shared)
    step = state.restore()
    try:
        distribute.check_same_on_every_worker(step, "the checkpoint step to resume from", (
            f"every worker must see the chief's {shared} (a shared file system) to resume"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    per_epoch = data.steps_per_epoch(splits.info.num_train, batch_size)
    epoch, offset = divmod(step, per_epoch)
    if step:
        print(f"resuming from {state.latest} at step {step} (epoch {epoch + 1}, batch {offset + 1})", flush=True)
    saver = checkpointing.CheckpointCallback(state)
    callbacks = [saver, checkpointing.NanGuard(state)]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "logs")))
    legs = []  # (first epoch, last epoch, steps per epoch): finish an interrupted epoch first
    if offset and epoch < epochs:
        legs.append((epoch, epoch + 1, per_epoch - offset))
        epoch += 1
    if epoch < epochs:
        legs.append((epoch, epochs, per_epoch))
    for first, last, steps in legs:
        model.fit(
            splits.train_from(state.step), initial_epoch=first, epochs=last, steps_per_epoch=steps,
            total_epochs=epochs, validation_data=splits.test, callbacks=callbacks, verbose=verbose,
        )
        if saver.stopped_by_signal:
            raise Interrupted(
                f"stopped by SIGTERM at step {state.step}; checkpoint {state.latest}. "
                "Run the same command again to resume."
            )
    if not chief:
        shutil.rmtree(directory, ignore_errors=True)
    return state


def train_and_evaluate(config, splits, out_dir, method_name=None, init_from=None, epochs=None,
                       bb_source=None):
    """Train one model into out_dir and measure it; returns (metrics, path of the saved model).

    Under a multi-worker strategy every worker trains and measures (the steps are
    collective), and only the chief writes into out_dir; the others save the model in
    a temporary folder, which is where they find it again.
    """
    start = time.time()
    chief = distribute.is_chief()
    model_dir = out_dir if chief else tempfile.mkdtemp(prefix="anp_vs_tf_worker_")
    os.makedirs(model_dir, exist_ok=True)
    epochs = config.epochs if epochs is None else epochs
    model = build(config, splits.info, method_name, init_from, epochs)
    if epochs:
        fit(model, splits, epochs, config.batch_size, out_dir, verbose=config.verbose)
    model_path = os.path.join(model_dir, "model.keras")
    model.save(model_path)
    metrics = measure(model, splits, config, out_dir, bb_source)
    metrics.update(
        method=model.method.name,
        model=config.model,
        dataset=config.dataset,
        epochs=epochs,
        wall_time_s=time.time() - start,
    )
    if chief:
        _write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics, model_path


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
        on_bad_file=config.on_bad_file,
        validation_examples=config.validation_examples,
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
    out = prepare_out_dir(config) if distribute.is_chief() else config.out_dir
    keras.utils.set_random_seed(config.seed)
    rows = []
    init_from = config.init_from
    if config.pretrain_epochs:
        base_dir = os.path.join(out, "base")
        if os.path.exists(os.path.join(base_dir, "metrics.json")):
            with open(os.path.join(base_dir, "metrics.json")) as f:
                base_metrics = json.load(f)
            init_from = os.path.join(base_dir, "model.keras")
        else:
            base_metrics, init_from = train_and_evaluate(
                config, splits, base_dir, method_name="standard", epochs=config.pretrain_epochs,
                bb_source=bb_source,
            )
        rows.append((f"{report.PAPER_NAMES['standard']} (base)", base_metrics))
    metrics, _ = train_and_evaluate(config, splits, out, init_from=init_from, bb_source=bb_source)
    metrics["wall_time_s"] = time.time() - start
    if distribute.is_chief():
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
    chief = distribute.is_chief()
    out = prepare_out_dir(config) if chief else config.out_dir
    metrics = measure(model, splits, config, out, bb_source)
    metrics.update(method=model.method.name, model=model_name, dataset=config.dataset,
                   model_path=config.model_path, wall_time_s=time.time() - start)
    if chief:
        _write_json(os.path.join(out, "metrics.json"), metrics)
    print(report.format_table([(report.PAPER_NAMES.get(model.method.name, model.method.name), metrics)]))
    return metrics


def run_tune(config):
    """Search the method's settings with keras-tuner; resumes an interrupted search."""
    from anp_vs_tf import tuning  # keras-tuner loads only when a search is asked for

    check_out_dir(config)
    splits = _load_data(config)
    out = prepare_out_dir(config) if distribute.is_chief() else config.out_dir
    rows = tuning.run_tune(config, splits, out)
    done = [r for r in rows if r["status"] == "COMPLETED"]
    print(f"{len(done)} of {len(rows)} trials completed; {os.path.join(out, 'tuning.csv')}"
          + (f", best settings in {os.path.join(out, 'best.cfg')}" if done else ""))
    return rows


def run(config: RunConfig):
    """Run `config` (mode train, eval, tune or export) and return what it measured.

    train and eval return the metrics, tune the trials' rows, export its report.

    Models, optimizers and metrics are created under the strategy's scope, so training
    and evaluation run on one device, several GPUs or several machines alike.
    """
    config = config.resolved()
    if config.mode == "export":
        from anp_vs_tf.export import export_file  # TF Serving export, only when asked

        return export_file(config.model_path, config.export_dir, config.version)
    try:
        strategy = distribute.make_strategy(config.strategy, config.devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    with strategy.scope():
        if config.mode == "tune":
            return run_tune(config)
        return run_train(config) if config.mode == "train" else run_eval(config)
