"""Command line: `python -m anp_vs_tf.main --flagfile=configs/NAME.cfg [--flag=value ...]`.

Flags become a `RunConfig` (anp_vs_tf.config) and the run is `experiment.run(config)`:
the same Python API a script or notebook calls. Flags left unset take the data set's
preset (the authors' settings). Any setting that cannot work stops the run with one
line on stderr and exit status 2, before data is loaded or anything is written.
"""

import dataclasses
import sys

from absl import app, flags, logging

from anp_vs_tf import experiment
from anp_vs_tf.config import AUTOATTACK_VERSIONS, DATASET_PRESETS, MODES, TUNERS, RunConfig
from anp_vs_tf.errors import ConfigError, Interrupted, SearchFailed
from anp_vs_tf.metrics.unit_costs import KL_WEIGHTINGS
from anp_vs_tf.models.prunable import GROUPINGS
from anp_vs_tf.checkpointing import TrainingDiverged
from anp_vs_tf.data import DataError
from anp_vs_tf.distribute import STRATEGIES
from anp_vs_tf.trainers import method_names

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "train", MODES, "train a model, eval a saved one (--model_path), export "
                  "it, pruned units removed, as a SavedModel for TF Serving (--export_dir, --version), "
                  "or tune the method's settings with keras-tuner (--tuner, --max_trials, --min_sparsity).")
flags.DEFINE_enum("method", "anp_vs", method_names(), "training method.")
flags.DEFINE_string("model", None, "architecture: lenet_300_100, lenet5_caffe, vgg16, resnet20, "
                    "preact_resnet18 (default: per dataset).")
flags.DEFINE_enum("dataset", "mnist", list(DATASET_PRESETS), "data set ('folder': your own tree at --data_dir).")
flags.DEFINE_string("data_dir", None, "folder with the data (IDX files or train/ and test/ image folders); "
                    "default: $ANP_VS_DATA_DIR, then system packages, then tensorflow-datasets.")
flags.DEFINE_string("out_dir", "runs/default", "where checkpoints, logs, model.keras and metrics.json go.")
flags.DEFINE_string("model_path", None, "a .keras model saved by anp_vs_tf (for --mode=eval).")
flags.DEFINE_string("export_dir", None, "--mode=export: the model's folder; versions go to DIR/N/.")
flags.DEFINE_integer("version", 1, "--mode=export: the version number (an existing one is never overwritten).")
flags.DEFINE_string("init_from", None, "a .keras model of the same architecture to start from (pretrained base).")
flags.DEFINE_integer("pretrain_epochs", 0, "first train a standard base model for this many epochs "
                     "and start from it (instead of --init_from).")
flags.DEFINE_integer("epochs", 1, "training epochs.")
flags.DEFINE_integer("batch_size", 128, "training batch size.")
flags.DEFINE_integer("eval_batch_size", 1000, "evaluation batch size.")
flags.DEFINE_float("eps", None, "L-inf radius of the attack (default: per dataset).")
flags.DEFINE_float("step_size", None, "PGD step size in training (default: per dataset).")
flags.DEFINE_integer("pgd_steps", None, "PGD steps in training (default: per dataset).")
flags.DEFINE_integer("eval_pgd_steps", 40, "PGD steps in evaluation.")
flags.DEFINE_float("eval_step_size", None, "PGD step size in evaluation (default: the dataset's step size).")
flags.DEFINE_float("adv_weight", 2.0, "w in (CE(x) + w CE(x_adv)) / (1 + w).")
flags.DEFINE_float("beta_kl", None, "beta: weight of the masks' KL per training example (default: per dataset).")
flags.DEFINE_enum("mask_groups", "all", list(GROUPINGS),
                  "residual models: mask every channel group (all), or leave the channels a residual "
                  "Add ties together unmasked (inner: only the channels inside the blocks).")
flags.DEFINE_enum("kl_weighting", "uniform", list(KL_WEIGHTINGS),
                  "the masks' KL per unit: uniform (the paper's), or weighted by what a unit costs (flops, params, memory).")
flags.DEFINE_float("target_flops_speedup", None,
                   "Prune to at least this many times fewer FLOPs (bp, anp, anp_vs): the KL's weight "
                   "adapts until the network is there, then the masks are frozen and the weights "
                   "fine-tuned for the last --finetune_fraction of the epochs.")
flags.DEFINE_float("target_memory_pct", None,
                   "Prune to at most this percentage of the dense network's memory (params plus "
                   "activations; bp, anp, anp_vs), as --target_flops_speedup does; either or both.")
flags.DEFINE_float("finetune_fraction", 0.3,
                   "With a target, the fraction of the epochs that fine-tunes the frozen network.")
flags.DEFINE_float("lambda_vs", None, "lambda: weight of the vulnerability suppression loss (default: per dataset).")
flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay on the kernels.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate of the weights.")
flags.DEFINE_float("mask_lr", 1e-2, "Adam learning rate of the Beta-Bernoulli mask parameters.")
flags.DEFINE_list("lr_decay_at", None, "fractions of training where both learning rates drop x0.1 "
                  "(default: 0.5,0.7 for MNIST, 0.5,0.8 for CIFAR).")
flags.DEFINE_float("mask_a_init", 0.31326169, "initial Kumaraswamy a of every mask (E[pi] = a/(a+1) for b=1).")
flags.DEFINE_float("mask_b_init", 1.0, "initial Kumaraswamy b of every mask.")
flags.DEFINE_float("beta_trades", 6.0, "TRADES: weight of KL(f(x) || f(x_adv)).")
flags.DEFINE_float("weight_sparsity", None, "ADMM: fraction of each kernel's weights to prune "
                   "(default: 0.8 for MNIST, 0.75 for CIFAR).")
flags.DEFINE_float("admm_rho", 1e-2, "ADMM: weight rho of the augmented-Lagrangian penalty.")
flags.DEFINE_float("admm_fraction", 0.5, "ADMM: fraction of the epochs in the ADMM phase; the rest "
                   "retrains the hard-pruned network.")
flags.DEFINE_float("bnn_kl_weight", 100.0, "AT BNN: the weights' KL enters the loss as KL / (N * this).")
flags.DEFINE_integer("bnn_samples", 10, "AT BNN: weight draws averaged by predictions and attacks.")
flags.DEFINE_float("bnn_prior_stddev", None, "AT BNN: prior std of every weight (default: 1 MNIST, 0.1 CIFAR).")
flags.DEFINE_float("bnn_init_rho", None, "AT BNN: initial rho, sigma = softplus(rho) (default: -3 MNIST, -5 CIFAR).")
flags.DEFINE_bool("mixed_precision", False, "train in bfloat16 with float32 weights (Keras' mixed_bfloat16): "
                  "faster on CPUs with AVX512-BF16 or AMX; evaluation and export stay float32.")
flags.DEFINE_integer("seed", 0, "random seed (weights, data order, masks, attacks).")
flags.DEFINE_integer("train_subset", None, "use a class-balanced subset of this many training examples.")
flags.DEFINE_integer("test_subset", None, "use a class-balanced subset of this many test examples.")
flags.DEFINE_string("bb_source", None, "a .keras model (any method) to craft black-box transfer attacks on.")
flags.DEFINE_bool("fgsm", True, "also measure FGSM accuracy (fgsm_acc).")
flags.DEFINE_integer("eot_samples", 0, "if > 1, also attack the stochastic network with PGD averaging the "
                     "gradient over this many mask samples (eot_acc).")
flags.DEFINE_integer("sanity_examples", 1000, "test examples for the gradient-masking checks (0: skip).")
flags.DEFINE_enum("autoattack", "none", list(AUTOATTACK_VERSIONS), "also evaluate with AutoAttack "
                  "(aa_acc): standard (APGD-CE, APGD-T, FAB-T, Square) or rand (APGD-CE, APGD-DLR with "
                  "20 draws, for the stochastic network).")
flags.DEFINE_integer("autoattack_examples", None, "AutoAttack the first N test examples (default: all).")
flags.DEFINE_bool("plots", True, "write the run's figures to out_dir/plots.")
flags.DEFINE_enum("tuner", "random", list(TUNERS), "--mode=tune: keras-tuner's RandomSearch, "
                  "BayesianOptimization or Hyperband (max_epochs: --epochs).")
flags.DEFINE_integer("max_trials", 10, "--mode=tune: number of trials (random, bayesian).")
flags.DEFINE_float("min_sparsity", 0.0, "--mode=tune: trials pruning less than this percent of the "
                   "units score below every trial that prunes enough.")
flags.DEFINE_integer("validation_examples", None, "training examples held out to score trials "
                     "(default: 5000 for --mode=tune, else 0); never the test set.")
flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy: default (one device), "
                  "mirrored (local GPUs, or --devices), multi_worker (TF_CONFIG), tpu.")
flags.DEFINE_list("devices", None, "--strategy=mirrored: the devices, e.g. /gpu:0,/gpu:1 (default: all GPUs).")
flags.DEFINE_enum("on_bad_file", "skip", ["skip", "error"], "image folders: skip unreadable images "
                  "(with a count) or stop at the first.")
flags.DEFINE_bool("download", True, "let tensorflow-datasets download a data set found nowhere else.")
flags.DEFINE_bool("overwrite", False, "allow replacing a finished run in --out_dir.")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")


def config_from_flags():
    """The RunConfig the flags describe."""
    values = {field.name: FLAGS[field.name].value for field in dataclasses.fields(RunConfig)}
    if values["devices"] is not None:
        values["devices"] = tuple(values["devices"])
    if values["lr_decay_at"] is not None:
        try:
            values["lr_decay_at"] = tuple(float(v) for v in values["lr_decay_at"])
        except ValueError:
            raise ConfigError(f"--lr_decay_at takes numbers, got {','.join(values['lr_decay_at'])}.") from None
    return RunConfig(**values)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])}; all settings are --flags.")
    if not FLAGS["verbosity"].present:  # TensorFlow's INFO lines would drown the progress bar
        logging.set_verbosity(logging.WARNING)
    try:
        experiment.run(config_from_flags())
    except (ConfigError, DataError, SearchFailed) as error:
        _fail(str(error))
    except TrainingDiverged as error:
        _fail(str(error), status=3)
    except Interrupted as error:
        print(f"anp_vs_tf: {error}", file=sys.stderr)
        sys.exit(143)


def _fail(message, status=2):
    print(f"anp_vs_tf: error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv):
    """absl's parser, with a bad flag or flagfile reported in one line."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        _fail(f"{error}. Run with --helpfull to list the flags.")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
