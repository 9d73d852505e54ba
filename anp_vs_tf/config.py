"""A run's settings in one object, with the paper's defaults per data set.

The CLI turns flags into a `RunConfig`; notebooks and scripts can build one directly.
Anything left as None takes the preset of the data set (the authors' released
settings), so a flagfile only states what differs.
"""

import dataclasses
import math
import os
from typing import Optional, Tuple

from anp_vs_tf.distribute import STRATEGIES
from anp_vs_tf.errors import ConfigError
from anp_vs_tf.metrics.unit_costs import KL_WEIGHTINGS
from anp_vs_tf.models.prunable import GROUPINGS
from anp_vs_tf.models.zoo import RESIDUAL
from anp_vs_tf.trainers import method_names, method_switches

# The authors' settings (reference/paper-results.md). step_size is the PGD step in
# training and, unless eval_step_size says otherwise, in evaluation too.
DATASET_PRESETS = {
    "mnist": dict(model="lenet5_caffe", eps=0.3, step_size=0.01, pgd_steps=20, beta_kl=4.0,
                  lambda_vs=1e-3, lr_decay_at=(0.5, 0.7), weight_sparsity=0.8,
                  bnn_prior_stddev=1.0, bnn_init_rho=-3.0),
    "fashion_mnist": dict(model="lenet5_caffe", eps=0.1, step_size=0.01, pgd_steps=20, beta_kl=4.0,
                          lambda_vs=1e-3, lr_decay_at=(0.5, 0.7), weight_sparsity=0.8,
                          bnn_prior_stddev=1.0, bnn_init_rho=-3.0),
    "cifar10": dict(model="vgg16", eps=0.03, step_size=0.007, pgd_steps=10, beta_kl=2.0,
                    lambda_vs=1e-4, lr_decay_at=(0.5, 0.8), weight_sparsity=0.75,
                   bnn_prior_stddev=0.1, bnn_init_rho=-5.0),
    "cifar100": dict(model="vgg16", eps=0.03, step_size=0.007, pgd_steps=10, beta_kl=1.0,
                     lambda_vs=0.1, lr_decay_at=(0.5, 0.8), weight_sparsity=0.75,
                     bnn_prior_stddev=0.1, bnn_init_rho=-5.0),
    "folder": dict(model=None, eps=0.03, step_size=0.007, pgd_steps=10, beta_kl=2.0,
                   lambda_vs=1e-4, lr_decay_at=(0.5, 0.8), weight_sparsity=0.75,
                    bnn_prior_stddev=0.1, bnn_init_rho=-5.0),
}

MODES = ("train", "eval", "export", "tune")
AUTOATTACK_VERSIONS = ("none", "standard", "rand")  # --autoattack
TUNERS = ("random", "bayesian", "hyperband")  # keras-tuner searches for --mode=tune


@dataclasses.dataclass
class RunConfig:
    """Everything a training or evaluation run needs. See `anp_vs_tf.main` for the flags."""

    mode: str = "train"
    method: str = "anp_vs"
    model: Optional[str] = None
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    out_dir: str = "runs/default"
    model_path: Optional[str] = None
    export_dir: Optional[str] = None
    version: int = 1
    init_from: Optional[str] = None
    pretrain_epochs: int = 0
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 1000
    eps: Optional[float] = None
    step_size: Optional[float] = None
    pgd_steps: Optional[int] = None
    eval_pgd_steps: int = 40
    eval_step_size: Optional[float] = None
    adv_weight: float = 2.0
    beta_kl: Optional[float] = None
    kl_weighting: str = "uniform"
    mask_groups: str = "all"
    target_flops_speedup: Optional[float] = None
    target_memory_pct: Optional[float] = None
    finetune_fraction: float = 0.3
    lambda_vs: Optional[float] = None
    weight_decay: float = 1e-4
    lr: float = 1e-3
    mask_lr: float = 1e-2
    lr_decay_at: Optional[Tuple[float, ...]] = None
    mask_a_init: float = 0.31326169
    mask_b_init: float = 1.0
    beta_trades: float = 6.0
    weight_sparsity: Optional[float] = None
    admm_rho: float = 1e-2
    admm_fraction: float = 0.5
    bnn_kl_weight: float = 100.0
    bnn_samples: int = 10
    bnn_prior_stddev: Optional[float] = None
    bnn_init_rho: Optional[float] = None
    seed: int = 0
    mixed_precision: bool = False
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    bb_source: Optional[str] = None
    fgsm: bool = True
    eot_samples: int = 0
    sanity_examples: int = 1000
    autoattack: str = "none"
    autoattack_examples: Optional[int] = None
    plots: bool = True
    tuner: str = "random"
    max_trials: int = 10
    min_sparsity: float = 0.0
    validation_examples: Optional[int] = None
    strategy: str = "default"
    devices: Optional[Tuple[str, ...]] = None
    on_bad_file: str = "skip"
    download: bool = True
    overwrite: bool = False
    verbose: int = 1

    def resolved(self):
        """A copy with the data set's presets filled in, validated."""
        if self.dataset not in DATASET_PRESETS:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_PRESETS)}."
            )
        preset = DATASET_PRESETS[self.dataset]
        filled = {
            key: preset[key] if getattr(self, key) is None and key in preset else getattr(self, key)
            for key in (f.name for f in dataclasses.fields(self))
        }
        config = RunConfig(**filled)
        if config.eval_step_size is None:  # the paper's evaluation, whatever training used
            config.eval_step_size = preset["step_size"]
        config.lr_decay_at = tuple(config.lr_decay_at or ())
        if config.validation_examples is None:  # tuning scores on held-out training data
            config.validation_examples = 5000 if config.mode == "tune" else 0
        config.validate()
        return config

    def validate(self):
        """Raise ConfigError for the first setting that cannot work, before any work starts."""
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        need(self.mode in MODES, f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        need(self.method in method_names(),
             f"unknown method {self.method!r}; choose one of {', '.join(method_names())}.")
        need(self.model is not None or self.mode != "train",
             f"dataset {self.dataset!r} has no default model; pass --model.")
        need(self.eps >= 0, f"eps must be >= 0, got {self.eps}.")
        need(self.step_size > 0 and self.eval_step_size > 0, "step sizes must be > 0.")
        need(self.pgd_steps >= 1 and self.eval_pgd_steps >= 1, "PGD step counts must be >= 1.")
        need(self.epochs >= 0 and self.pretrain_epochs >= 0, "epoch counts must be >= 0.")
        need(self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1.")
        need(self.mask_groups in GROUPINGS,
             f"unknown mask_groups {self.mask_groups!r}; choose one of {', '.join(GROUPINGS)}.")
        need(self.mask_groups == "all" or self.model in RESIDUAL,
             f"--mask_groups={self.mask_groups} applies to the residual models ({', '.join(RESIDUAL)}); "
             f"{self.model} has no residual channels.")
        need(self.kl_weighting in KL_WEIGHTINGS,
             f"unknown kl_weighting {self.kl_weighting!r}; choose one of {', '.join(KL_WEIGHTINGS)}.")
        for flag in ("target_flops_speedup", "target_memory_pct"):
            if getattr(self, flag) is not None:
                need(method_switches(self.method)["prunes"],
                     f"--{flag} prunes with masks, and {self.method} has none: use bp, anp or anp_vs.")
        if self.target_flops_speedup is not None:
            need(self.target_flops_speedup > 1,
                 f"--target_flops_speedup is a factor of fewer FLOPs, > 1; got {self.target_flops_speedup}.")
        if self.target_memory_pct is not None:
            need(0 < self.target_memory_pct < 100,
                 f"--target_memory_pct is a percentage of the dense network's memory, in (0, 100); "
                 f"got {self.target_memory_pct}.")
        need(0 <= self.finetune_fraction < 1,
             f"finetune_fraction is a fraction of the epochs in [0, 1), got {self.finetune_fraction}.")
        for name in ("adv_weight", "beta_kl", "lambda_vs", "weight_decay"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}.")
        need(0 < self.lr < math.inf and 0 < self.mask_lr < math.inf, "learning rates must be finite and > 0.")
        need(all(0 < f < 1 for f in self.lr_decay_at),
             f"lr_decay_at holds fractions of training in (0, 1), got {list(self.lr_decay_at)}.")
        need(self.mask_a_init > 0 and self.mask_b_init > 0, "mask_a_init and mask_b_init must be > 0.")
        need(self.beta_trades >= 0 and self.admm_rho >= 0, "beta_trades and admm_rho must be >= 0.")
        need(0 <= self.weight_sparsity < 1, f"weight_sparsity is a fraction in [0, 1), got {self.weight_sparsity}.")
        need(0 <= self.admm_fraction <= 1, f"admm_fraction is a fraction in [0, 1], got {self.admm_fraction}.")
        need(self.bnn_kl_weight > 0 and self.bnn_prior_stddev > 0 and self.bnn_samples >= 1,
             "bnn_kl_weight and bnn_prior_stddev must be > 0, bnn_samples >= 1.")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be positive, got {value}.")
        if self.mode in ("eval", "export"):
            need(self.model_path is not None, f"--mode={self.mode} needs --model_path=PATH.keras.")
            need(os.path.exists(self.model_path), f"--model_path {self.model_path} does not exist.")
        if self.mode == "export":
            need(self.export_dir is not None, "--mode=export needs --export_dir=DIR (the model's folder for TF Serving).")
            need(self.version >= 1, f"--version must be a positive integer, got {self.version}.")
        need(self.tuner in TUNERS, f"unknown tuner {self.tuner!r}; choose one of {', '.join(TUNERS)}.")
        need(self.max_trials >= 1, f"max_trials must be >= 1, got {self.max_trials}.")
        need(0 <= self.min_sparsity < 100, f"min_sparsity is a percentage in [0, 100), got {self.min_sparsity}.")
        need(self.validation_examples >= 0, f"validation_examples must be >= 0, got {self.validation_examples}.")
        if self.mode == "tune":
            need(self.validation_examples > 0, "--mode=tune scores trials on held-out training data: "
                 "--validation_examples must be > 0.")
            need(self.epochs >= 1, "--mode=tune trains every trial for --epochs: it must be >= 1.")
            switches = method_switches(self.method)
            need(switches["prunes"] or switches["suppress_vulnerability"],
                 f"method {self.method} has nothing of ANP-VS to tune (no masks, no λ); --mode=tune "
                 "searches λ, β, the masks and w_adv: use anp_vs, anp, at_vs or bp.")
            need(switches["prunes"] or self.min_sparsity == 0,
                 f"--min_sparsity needs a method with masks; {self.method} prunes nothing.")
        need(self.strategy in STRATEGIES,
             f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        need(not self.devices or self.strategy == "mirrored", "--devices goes with --strategy=mirrored.")
        need(self.on_bad_file in ("skip", "error"), f"on_bad_file is skip or error, got {self.on_bad_file!r}.")
        need(self.eot_samples >= 0 and self.sanity_examples >= 0,
             "eot_samples and sanity_examples must be >= 0.")
        need(self.autoattack in AUTOATTACK_VERSIONS,
             f"unknown autoattack {self.autoattack!r}; choose one of {', '.join(AUTOATTACK_VERSIONS)}.")
        need(self.autoattack_examples is None or self.autoattack_examples > 0,
             f"autoattack_examples must be positive (or unset: the whole test set), got {self.autoattack_examples}.")
        if self.bb_source is not None:
            need(os.path.exists(self.bb_source),
                 f"--bb_source {self.bb_source} does not exist; train a source model first "
                 "(e.g. --method=standard with another --seed).")
        if self.init_from is not None:
            need(os.path.exists(self.init_from),
                 f"--init_from {self.init_from} does not exist; train a base model first "
                 "(--method=standard) or use --pretrain_epochs.")
        need(not (self.init_from and self.pretrain_epochs),
             "use either --init_from or --pretrain_epochs, not both.")
        need(self.mode == "eval" or not method_switches(self.method)["needs_pretrained"]
             or self.init_from or self.pretrain_epochs,
             f"method {self.method} starts from a pretrained standard model: pass --init_from "
             "or --pretrain_epochs.")
