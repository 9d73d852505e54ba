"""Hyperparameter search for ANP-VS with keras-tuner.

The objective is robust accuracy on a held-out part of the training data (never the test
set), under a sparsity constraint: a trial whose network keeps more than
(100 - min_sparsity)% of its units scores its robust accuracy minus 1, below every trial
that meets the constraint, and among failing trials the more robust still ranks higher.

    out_dir/tuner/       keras-tuner's own files: trials resume from them (overwrite=False)
    out_dir/tuning.csv   one row per trial: status, hyperparameters, scores
    out_dir/best.cfg     the run's flags with the best trial's values: pass it to --flagfile
"""

import csv
import dataclasses
import os

import keras
import keras_tuner
import tensorflow as tf

from anp_vs_tf import attacks, building, data
from anp_vs_tf.errors import SearchFailed
from anp_vs_tf.config import RunConfig
from anp_vs_tf.files import atomic_write, write_text
from anp_vs_tf.trainers import method_switches

OBJECTIVE = keras_tuner.Objective("val_score", direction="max")

# (setting, kind, low, high): log-uniform for scales, uniform for the adversarial weight.
SEARCH_SPACE = (
    ("lambda_vs", "log", 1e-4, 1.0),
    ("beta_kl", "log", 0.5, 20.0),
    ("mask_lr", "log", 1e-3, 1e-1),
    ("mask_a_init", "log", 0.3, 10.0),
    ("mask_b_init", "log", 0.5, 5.0),
    ("adv_weight", "linear", 0.5, 4.0),
)
_NEEDS = {"lambda_vs": "suppress_vulnerability", "beta_kl": "prunes", "mask_lr": "prunes",
          "mask_a_init": "prunes", "mask_b_init": "prunes", "adv_weight": "adversarial"}


def searched_settings(method):
    """The settings of SEARCH_SPACE that `method` uses (a method without masks has no β)."""
    switches = method_switches(method)
    return tuple(entry for entry in SEARCH_SPACE if switches.get(_NEEDS[entry[0]], False))


class SparsityConstrainedScore(keras.callbacks.Callback):
    """Adds val_score (the tuner's objective) and sparsity to each epoch's logs.

    Runs after Keras' validation pass, whose `val_acc_adv` is the robust accuracy on the
    held-out split; it must come before keras-tuner's own callbacks in the list, which
    read val_score to keep the best epoch.
    """

    def __init__(self, min_sparsity):
        super().__init__()
        self.min_sparsity = min_sparsity

    def on_epoch_end(self, epoch, logs=None):
        sparsity = float(self.model.sparsity())
        robust = float(logs["val_acc_adv"])
        logs["val_sparsity"] = sparsity
        logs["val_score"] = robust if sparsity >= self.min_sparsity else robust - 1.0


class AnpVsHyperModel(keras_tuner.HyperModel):
    """Builds the run's model with a trial's settings and trains it on the run's data."""

    def __init__(self, config, splits):
        super().__init__(name=f"{config.method}_{config.dataset}")
        self.config = config
        self.splits = splits

    def trial_config(self, hp):
        values = {}
        for name, kind, low, high in searched_settings(self.config.method):
            values[name] = hp.Float(name, low, high, sampling=kind)
        return dataclasses.replace(self.config, **values)

    def build(self, hp):
        config = self.trial_config(hp)
        model = building.build(config, self.splits.info, init_from=config.init_from)
        # Validation measures robustness with the run's training attack (the tuning budget).
        model.set_eval_adversary(attacks.PGD(config.eps, config.step_size, config.pgd_steps))
        return model

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0, **kwargs):
        # Every trial trains on the run's own stream from its first epoch on (Hyperband's
        # later brackets from `initial_epoch`), the batches `--mode=train` would see.
        steps = data.steps_per_epoch(self.splits.info.num_train, self.config.batch_size)
        return model.fit(
            self.splits.train_from(initial_epoch * steps), steps_per_epoch=steps,
            validation_data=self.splits.validation,
            epochs=self.config.epochs if epochs is None else epochs, initial_epoch=initial_epoch,
            callbacks=[SparsityConstrainedScore(self.config.min_sparsity), *(callbacks or [])],
            verbose=self.config.verbose,
        )


def make_tuner(config, hypermodel, directory):
    """The keras-tuner search named by config.tuner, resuming whatever is in `directory`."""
    common = dict(objective=OBJECTIVE, directory=directory, project_name="tuner", overwrite=False,
                  seed=config.seed, max_consecutive_failed_trials=config.max_trials)
    if config.tuner == "random":
        return keras_tuner.RandomSearch(hypermodel, max_trials=config.max_trials, **common)
    if config.tuner == "bayesian":
        return keras_tuner.BayesianOptimization(hypermodel, max_trials=config.max_trials, **common)
    return keras_tuner.Hyperband(hypermodel, max_epochs=max(config.epochs, 2), **common)


def trial_rows(tuner, method):
    """One dict per trial: id, status, searched values, score, robust accuracy, sparsity."""
    names = [entry[0] for entry in searched_settings(method)]
    rows = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id):
        row = {"trial_id": trial.trial_id, "status": trial.status}
        row.update({name: trial.hyperparameters.values.get(name) for name in names})
        for metric in ("val_score", "val_acc_adv", "val_acc", "val_sparsity"):
            if trial.metrics.exists(metric):
                row[metric] = trial.metrics.get_best_value(metric) if metric == "val_score" else \
                    trial.metrics.get_last_value(metric)
            else:
                row[metric] = None
        rows.append(row)
    return rows


def write_csv(rows, path):
    fields = list(rows[0]) if rows else ["trial_id", "status"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


_NOT_FLAGS_OF_A_RUN = ("overwrite", "tuner", "max_trials", "min_sparsity")


def flag_lines(config, **overrides):
    """`config` as --flag=value lines: every setting that differs from RunConfig's default."""
    defaults = RunConfig()
    config = dataclasses.replace(config, **overrides)
    lines = []
    for field in dataclasses.fields(RunConfig):
        value = getattr(config, field.name)
        if field.name in _NOT_FLAGS_OF_A_RUN or value is None or value == getattr(defaults, field.name):
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        lines.append(f"--{field.name}={value}")
    return lines


def write_best_flagfile(config, best_values, path):
    """The flagfile that trains the best trial's settings on the whole training set."""
    out_dir = os.path.join(os.path.dirname(config.out_dir.rstrip("/")) or ".",
                           os.path.basename(config.out_dir.rstrip("/")) + "_best")
    lines = flag_lines(config, mode="train", out_dir=out_dir, validation_examples=0, **best_values)
    header = f"# Best of the {config.tuner} search in {config.out_dir} (validation robust accuracy"
    header += f", sparsity >= {config.min_sparsity}%).\n"
    write_text(path, header + "\n".join(lines) + "\n")


def run_tune(config, splits, out_dir):
    """Search, then write tuning.csv and best.cfg; returns the trials' rows."""
    tuner = make_tuner(config, AnpVsHyperModel(config, splits), out_dir)
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # every trial's new model retraces Keras' step, and TF warns about it
    try:
        tuner.search()
    except RuntimeError as error:  # keras-tuner gives up after every trial in a row failed
        rows = trial_rows(tuner, config.method)
        write_csv(rows, os.path.join(out_dir, "tuning.csv"))
        raise SearchFailed(
            f"every trial failed ({str(error).strip().splitlines()[0]}); see "
            f"{os.path.join(out_dir, 'tuning.csv')} and the trials in {os.path.join(out_dir, 'tuner')}."
        ) from None
    finally:
        logger.setLevel(level)
    rows = trial_rows(tuner, config.method)
    write_csv(rows, os.path.join(out_dir, "tuning.csv"))
    best = tuner.get_best_hyperparameters(1)
    if best:
        values = {name: best[0].values[name] for name, *_ in searched_settings(config.method)}
        write_best_flagfile(config, values, os.path.join(out_dir, "best.cfg"))
    return rows
