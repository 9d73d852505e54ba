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
The run's parts are built by `building` (shared with `tuning`), its folder is kept by
`run_dir`.
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import keras

from anp_vs_tf import checkpointing, data, distribute, evaluation, precision, report
from anp_vs_tf.building import build, eval_attack, eval_autoattack, load_bb_source, load_data, load_model_file
from anp_vs_tf.config import RunConfig
from anp_vs_tf.errors import ConfigError, Interrupted
from anp_vs_tf.metrics import complexity
from anp_vs_tf.files import write_json
from anp_vs_tf.run_dir import check_out_dir, prepare_out_dir
from anp_vs_tf.trainers import method_switches


def measure(model, splits, config, out_dir, bb_source=None):
    """evaluation.evaluate with the run's settings, and the run's figures, in float32."""
    model = precision.float32_copy(model)
    adversary = eval_attack(config)
    metrics = evaluation.evaluate(
        model, splits.test, adversary, fgsm_attack=config.fgsm, bb_source=bb_source,
        eot_samples=config.eot_samples, sanity_examples=config.sanity_examples,
        autoattack=eval_autoattack(config), autoattack_examples=config.autoattack_examples, verbose=config.verbose,
    )
    if config.plots and distribute.is_chief():
        from anp_vs_tf import plots  # matplotlib loads only when figures are drawn

        plots.write_run_plots(model, splits.test, adversary, out_dir, metrics=metrics)
    return metrics


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
        # Every epoch's logs (with masks: the kept units per layer), for plots.plot_pruning.
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(out_dir, "history.csv"), append=True))
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
    targets = model.method.targets
    if targets:
        deployed = complexity(model.backbone)
        missed = [t for t in targets if not t.met(deployed)]
        metrics.update(target_flops_speedup=model.method.target_flops_speedup,
                       target_memory_pct=model.method.target_memory_pct, target_met=not missed)
        if missed:
            warn(f"the pruned network has {deployed.flops_speedup:.2f}x fewer FLOPs and {deployed.memory_pct:.2f}% "
                 f"of the memory, short of its target ({', '.join(f'{t.kind} {t.value:g}' for t in missed)}): "
                 "no choice of units meets it.")
    metrics.update(
        method=model.method.name,
        model=config.model,
        dataset=config.dataset,
        epochs=epochs,
        wall_time_s=time.time() - start,
    )
    if chief:
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics, model_path


def warn(message):
    """One line on stderr that the user should read (the run goes on)."""
    print(f"anp_vs_tf: warning: {message}", file=sys.stderr, flush=True)


def at_chance(clean_acc, num_classes):
    """Whether a clean accuracy is within 2 points of guessing: the network learned nothing."""
    return clean_acc <= 1.0 / num_classes + 0.02


def run_train(config):
    """Train (after pretraining a base model if asked), evaluate, write metrics.json."""
    start = time.time()
    check_out_dir(config)
    if method_switches(config.method)["prunes"] and config.init_from is None and not config.pretrain_epochs:
        warn(f"--method={config.method} learns its masks on random weights, where most units are "
             "dropped in every step and the network often learns nothing; pass --init_from=BASE.keras "
             "(a --method=standard run) or --pretrain_epochs=N (configs/quickstart.cfg uses 2).")
    if config.init_from is not None:
        base = load_model_file(config.init_from, "--init_from")
        if base.backbone.name != config.model:
            raise ConfigError(
                f"--init_from {config.init_from} is a {base.backbone.name}, not a {config.model}."
            )
    bb_source = load_bb_source(config)
    splits = load_data(config)
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
        write_json(os.path.join(out, "metrics.json"), metrics)
    rows.append((report.PAPER_NAMES.get(config.method, config.method), metrics))
    print(report.format_table(rows))
    if at_chance(metrics["clean_acc"], splits.info.num_classes):
        warn(f"{config.method} ended at chance accuracy ({100 * metrics['clean_acc']:.1f}% clean for "
             f"{splits.info.num_classes} classes): it learned nothing"
             + ("; start the masks from a trained network (--init_from or --pretrain_epochs)."
                if method_switches(config.method)["prunes"] and init_from is None else "."))
    return metrics


def run_eval(config):
    """Evaluate a saved model on the test set; writes out_dir/metrics.json."""
    start = time.time()
    model = load_model_file(config.model_path, "--model_path")
    model_name = model.backbone.name
    config = dataclasses.replace(config, model=model_name)
    check_out_dir(config)
    bb_source = load_bb_source(config)
    splits = load_data(config)
    chief = distribute.is_chief()
    out = prepare_out_dir(config) if chief else config.out_dir
    metrics = measure(model, splits, config, out, bb_source)
    metrics.update(method=model.method.name, model=model_name, dataset=config.dataset,
                   model_path=config.model_path, wall_time_s=time.time() - start)
    if chief:
        write_json(os.path.join(out, "metrics.json"), metrics)
    print(report.format_table([(report.PAPER_NAMES.get(model.method.name, model.method.name), metrics)]))
    return metrics


def run_tune(config):
    """Search the method's settings with keras-tuner; resumes an interrupted search."""
    from anp_vs_tf import tuning  # keras-tuner loads only when a search is asked for

    check_out_dir(config)
    splits = load_data(config)
    out = prepare_out_dir(config) if distribute.is_chief() else config.out_dir
    rows = tuning.run_tune(config, splits, out)
    done = [r for r in rows if r["status"] == "COMPLETED"]
    print(f"{len(done)} of {len(rows)} trials completed; {os.path.join(out, 'tuning.csv')}"
          + (f", best settings in {os.path.join(out, 'best.cfg')}" if done else ""))
    return rows


def run_export(config):
    """The trained model at --model_path, compacted, as a TF Serving SavedModel."""
    from anp_vs_tf.export import export_file  # the export stack loads only when asked

    if config.model_path is None:
        raise ConfigError("--mode=export needs --model_path=PATH.keras.")
    if not config.export_dir:
        raise ConfigError("--mode=export needs --export_dir=DIR.")
    try:
        return export_file(config.model_path, config.export_dir, config.version)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def run(config: RunConfig):
    """Run `config` (mode train, eval, tune or export) and return what it measured.

    train and eval return the metrics, tune the trials' rows, export its report.

    Models, optimizers and metrics are created under the strategy's scope, so training
    and evaluation run on one device, several GPUs or several machines alike.
    """
    config = config.resolved()
    if config.mode == "export":
        return run_export(config)
    try:
        strategy = distribute.make_strategy(config.strategy, config.devices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    with strategy.scope():
        if config.mode == "tune":
            return run_tune(config)
        return run_train(config) if config.mode == "train" else run_eval(config)
