"""Choose paper_table.py's settings on held-out training images, never on the test set.

    ANP_VS_DATA_DIR=../shared/data python benchmarks/heldout.py --method standard --out_dir runs/heldout/base
    ANP_VS_DATA_DIR=../shared/data python benchmarks/heldout.py --method anp_vs --set lambda_vs=3 \
        --init_from runs/heldout/base/model.keras --out_dir runs/heldout/anp_vs_l3

Trains one method with paper_table.py's settings (overridden by --set) on the training
set minus 5,000 held-out images (class-balanced, the last of each class), then measures
PGD-40 robust accuracy, vulnerability and sparsity on those 5,000 and writes them to
OUT_DIR/result.json. β = 4 and λ = 3 in
paper_table.py were chosen this way, by ANP-VS's held-out robust accuracy (21 epochs).
--threads 1 lets two candidates train side by side on a 2-core machine.

With --flagfile, the settings are that flagfile's instead (the quickstart's defaults were
chosen so), and its --pretrain_epochs base is trained first, on the same held-out split:

    ANP_VS_DATA_DIR=../shared/data python benchmarks/heldout.py --flagfile configs/quickstart.cfg \
        --set target_flops_speedup=5 --out_dir runs/heldout/quickstart_x5
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import keras
import tensorflow as tf

from anp_vs_tf import building, data
from anp_vs_tf.metrics import attack_evaluation, complexity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_table import METHODS, settings  # noqa: E402  (the table's settings, so the choice carries over)


def parse_override(text):
    """`name=value` for a numeric RunConfig field (an int stays an int: pgd_steps=5)."""
    name, sep, value = text.partition("=")
    try:
        return name, int(value) if value.lstrip("-").isdigit() else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--set expects name=number, got {text!r}") from None


def flagfile_settings(path):
    """The resolved RunConfig of a flagfile, parsed as `python -m anp_vs_tf.main` parses it."""
    from absl import flags

    from anp_vs_tf import main as cli

    flags.FLAGS(["heldout", f"--flagfile={path}"])
    return cli.config_from_flags().resolved()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, help="default: the flagfile's method")
    parser.add_argument("--flagfile", help="a run's flagfile (e.g. configs/quickstart.cfg) instead of paper_table.py's settings")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "cifar10", "cifar100"])
    parser.add_argument("--epochs", type=int, default=21)
    parser.add_argument("--heldout", type=int, default=5000, help="training images held out for measuring")
    parser.add_argument("--init_from", help="the held-out base, for the methods that start from one")
    parser.add_argument("--set", type=parse_override, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--train_subset", type=int, help="for a smoke test")
    parser.add_argument("--threads", type=int, help="TensorFlow threads (1: two runs side by side)")
    args = parser.parse_args(argv)

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.flagfile:
        base = flagfile_settings(args.flagfile)
    elif args.method is None:
        parser.error("--method is needed without --flagfile")
    else:
        base = settings(args.dataset, args.out_dir, args.epochs, args.train_subset, None).resolved()
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = [name for name, _ in args.set if name not in fields]
    if unknown:
        parser.error(f"--set: {', '.join(unknown)} is not a RunConfig setting")
    for name in ("epochs", "heldout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if os.path.exists(os.path.join(args.out_dir, "result.json")):
        parser.error(f"{args.out_dir} already holds a result.json; choose another --out_dir")
    if args.init_from and not os.path.exists(args.init_from):
        parser.error(f"--init_from {args.init_from} does not exist; train the base first (--method standard)")
    # lambda_vs=3 stays a float; a setting whose default is None (a target) takes the number as given
    overrides = {name: value if getattr(base, name) is None else type(getattr(base, name))(value)
                 for name, value in args.set}
    config = dataclasses.replace(base, method=args.method or base.method, validation_examples=args.heldout,
                                 **overrides)

    splits = data.load(config.dataset, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                       validation_examples=args.heldout, train_subset=args.train_subset, seed=config.seed)
    keras.utils.set_random_seed(config.seed)
    start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    init_from = args.init_from
    if args.flagfile and config.pretrain_epochs and init_from is None:
        pretrained = building.build(config, splits.info, "standard", epochs=config.pretrain_epochs)
        pretrained.fit(splits.train, epochs=config.pretrain_epochs, verbose=2)
        init_from = os.path.join(args.out_dir, "base.keras")
        pretrained.save(init_from)
    model = building.build(config, splits.info, init_from=init_from)
    model.fit(splits.train, epochs=config.epochs, verbose=2)
    model.save(os.path.join(args.out_dir, "model.keras"))
    result = attack_evaluation(model, splits.validation, building.eval_attack(config))
    result.pop("feature_vulnerability", None)
    if model.mask_layers:
        report = complexity(model.backbone)
        result.update(flops_speedup=report.flops_speedup, memory_pct=report.memory_pct,
                      n_active=report.n_active)
    result.update(
        sparsity=float(model.sparsity()) if hasattr(model, "sparsity") else 0.0,
        train_minutes=(time.time() - start) / 60, method=args.method, overrides=overrides,
    )
    with open(os.path.join(args.out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
    main()
