"""What MirroredStrategy costs on this machine: training throughput over two logical CPU
devices relative to one device, for the same model, method and global batch.

    ANP_VS_DATA_DIR=../shared/data python benchmarks/strategy_speed.py [--json OUT.json]

Each strategy runs in its own process (logical devices must be configured before
TensorFlow starts): LeNet-5-Caffe on real MNIST, PGD-10 training attack, global batch
128, one warm-up window that traces the step, then `--windows` timed windows of
`--steps` steps each (at and anp_vs in turn); the median window gives examples/s, and
the median over `--rounds` processes per strategy, run alternately (the machine's speed
drifts), is what is compared. On a 2-core machine mirrored
cannot be faster (both replicas share the same cores); the number says what the
replica bookkeeping (per-replica attack, all-reduce, global random draws) costs.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from timing import fit_window, interleaved_seconds, median_rate

METHODS = ("at", "anp_vs")


def child(strategy_name, steps, windows, batch):
    import tensorflow as tf

    if strategy_name == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from anp_vs_tf import attacks, data, models
    from anp_vs_tf.trainers import RobustModel, get_method

    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if strategy_name == "mirrored"
                else tf.distribute.get_strategy())
    images, labels, _ = data.load_arrays("mnist", "train", download=False)
    n = batch * steps * (windows + 1)
    keep = data.class_balanced_subset(labels, min(n, len(labels)), 10)
    dataset = (tf.data.Dataset.from_tensor_slices((images[keep].astype("float32") / 255.0,
                                                   labels[keep].astype("int32")))
               .repeat().batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

    runs = {}
    for name in METHODS:
        with strategy.scope():
            keras.utils.set_random_seed(0)
            method = get_method(name, beta_kl=4.0, lambda_vs=1e-3, num_train_examples=60000)
            model = RobustModel(models.lenet5_caffe(prunable=method.prunes), method,
                                adversary=attacks.PGD(0.3, 0.03, 10), seed=0)
            model.compile(keras.optimizers.Adam(1e-3),
                          mask_optimizer=keras.optimizers.Adam(1e-2) if method.prunes else None)
        runs[name] = fit_window(model, dataset, steps)
    seconds = interleaved_seconds(runs, windows)
    result = {name: {"examples_per_s": median_rate(s, batch * steps),
                     "replicas": strategy.num_replicas_in_sync} for name, s in seconds.items()}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="processes per strategy, alternating")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=("one", "mirrored"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.windows, args.batch_size)))
        return
    runs = {"one": [], "mirrored": []}
    for _ in range(args.rounds):  # alternate the processes: the machine's speed drifts
        for strategy in runs:
            command = [sys.executable, __file__, f"--child={strategy}", f"--steps={args.steps}",
                       f"--windows={args.windows}", f"--batch_size={args.batch_size}"]
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if done.returncode:
                sys.exit(f"strategy_speed: the {strategy} run failed:\n{done.stderr[-3000:]}")
            runs[strategy].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {"runs": runs, "examples_per_s": {}, "slowdown": {}}
    print(f"{'method':8s} {'one device':>12s} {'mirrored x2':>12s} {'slowdown':>9s}  (examples/s, "
          f"LeNet-5-Caffe, PGD-10, global batch {args.batch_size}, median of {args.rounds} processes each)")
    for name in METHODS:
        one, mirrored = (float(np.median([r[name]["examples_per_s"] for r in runs[s]])) for s in runs)
        results["examples_per_s"][name] = {"one": one, "mirrored": mirrored}
        results["slowdown"][name] = one / mirrored
        print(f"{name:8s} {one:12.0f} {mirrored:12.0f} {one / mirrored:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
