"""Each faster kernel of `anp_vs_tf.kernels` against plain Keras, on this machine: the
evidence behind `kernels.choice.MEASURED`, the table `kernels="auto"` reads.

    ANP_VS_DATA_DIR=../shared/data python benchmarks/kernel_choice.py [--json OUT.json] [--rounds 5] [--traces 3]

For LeNet-5-Caffe (MNIST, PGD-20) and VGG-16 (CIFAR-10, PGD-10), batch 128, float32, the
attack of one AT step (`RobustModel.attack`: folded network, compiled) is timed with each
rewrite that applies to the model alone, with all of them, and with what
`kernels="auto"` picks on this machine, in alternation with the
plain kernels (the machine's speed drifts; see timing.py). oneDNN's graph rewrites are
won or lost per trace (a LeNet-5 attack identical to plain ran 0.78x of it in another
trace), so every variant is traced `--traces` times, each trace its own model and
`tf.function`, and the median over traces and rounds gives its time relative to plain.
The attack is ~k/(k+1) of an AT step, so these ratios are close to the step's.
"""

import argparse
import json
import subprocess
import time

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf import attacks, data, kernels, models
from anp_vs_tf.trainers import RobustModel

K = kernels.KernelChoice
VARIANTS = {
    "plain": kernels.PLAIN,
    "few_channel_conv": K(few_channel_conv=True),
    "conv_relu_pool": K(conv_relu_pool=True),
    "same_conv": K(same_conv=True),
    "chunks=2": K(attack_chunks=2),
    "own_gradient_function": K(own_gradient_function=True),
    "all": K(True, True, True, attack_chunks=2, own_gradient_function=True),
    "auto": "auto",  # what kernels.choose() picks here (kernels.choice.MEASURED)
}
CASES = {  # `skip`: rewrites with nothing to rewrite in that model (they equal plain)
    "lenet5_mnist": dict(model="lenet5_caffe", dataset="mnist", k=20, eps=0.3, step=0.01, calls=3,
                         skip=("same_conv",)),
    "vgg16_cifar10": dict(model="vgg16", dataset="cifar10", k=10, eps=0.03, step=0.007, calls=1,
                          skip=("conv_relu_pool",)),
}
BATCH = 128


def attack_timer(case, variant, x, y):
    keras.utils.set_random_seed(0)
    model = RobustModel(models.build_model(case["model"]), "at", seed=0, kernels="auto",
                        adversary=attacks.PGD(case["eps"], case["step"], case["k"]))
    model.compile(keras.optimizers.Adam(1e-3))

    @tf.function
    def attack(x, y):
        with kernels.use(variant):
            return model.attack(x, y, seed=tf.constant([1, 2]))

    def run():
        start = time.perf_counter()
        for _ in range(case["calls"]):
            attack(x, y).numpy()
        return (time.perf_counter() - start) / case["calls"]

    run()  # trace
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="kernel_choice.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--traces", type=int, default=3, help="independent traces of each variant")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "Model name" in line), "?")
    print(f"CPU: {model_name}; kernels.cpu_family() = {kernels.cpu_family()}", flush=True)
    results = {}
    for name in args.cases.split(","):
        case = CASES[name]
        images, labels, _ = data.load_arrays(case["dataset"], "train", download=False)
        x = tf.constant(images[:BATCH].astype("float32") / 255.0)
        y = tf.constant(labels[:BATCH].astype("int32"))
        variants = [v for v in VARIANTS if v not in case["skip"]]
        timers = [(v, attack_timer(case, VARIANTS[v], x, y)) for _ in range(args.traces) for v in variants]
        seconds = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v, run in timers:
                seconds[v].append(run())
        median = {v: float(np.median(s)) for v, s in seconds.items()}
        relative = {v: median[v] / median["plain"] for v in variants}
        results[name] = {"median_s": median, "relative_to_plain": relative, "seconds": seconds}
        for v in variants:
            low, high = np.percentile(seconds[v], [25, 75]) * 1000
            print(f"  {name:14s} {v:22s} {median[v] * 1000:8.1f} ms  x{relative[v]:.3f}"
                  f"  (quartiles {low:.0f}-{high:.0f} ms)", flush=True)
    with open(args.json, "w") as f:
        json.dump({"cpu": model_name, "cpu_family": kernels.cpu_family(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
