"""Training throughput: standard, AT and ANP-VS with this package, and the same AT with the
Adversarial Robustness Toolbox (ART), in one run, on the same data, model and batch.

    pip install adversarial-robustness-toolbox      # benchmark only, not a dependency
    ANP_VS_DATA_DIR=../shared/data python benchmarks/throughput.py [--json OUT.json] [--cases lenet5_mnist]
        [--kernels auto,keras] [--mixed_precision] [--art_our_layers]

Cases: LeNet-5-Caffe on MNIST with PGD-20 (eps 0.3, step 0.01), and VGG-16 on CIFAR-10
with PGD-10 (eps 0.03, step 0.007), batch 128. Each run: one warm-up window (tracing),
then timed windows of a few steps, the four runs taking turns window by window (the
machine's speed drifts; see timing.py); the median window gives examples/s.

  standard  RobustModel "standard": one forward-backward pass
            (--one_execution_per_window: our three runs compiled with Keras'
            steps_per_execution = the window's steps; --mixed_precision: our three
            runs built under Keras' mixed_bfloat16 policy, as --mixed_precision does
            for a training run, while ART keeps float32 as its users run it)
  at        RobustModel "at": PGD-k on the batch, then (CE(x) + 2 CE(x~)) / 3
  anp_vs    RobustModel "anp_vs": as at, plus masks (their own optimizer), KL and λ·V
  at[keras], anp_vs[keras]  (with --kernels auto,keras, the default) the same with
            RobustModel(kernels="keras"): plain Keras ops in the attack, where "auto"
            takes the faster kernels `anp_vs_tf.kernels` measured for this CPU; the
            targets are read on "auto", and the pair shows what the rewrites gain here
  art_at    ART: TensorFlowV2Classifier over the same network (no masks) in plain
            Keras layers, as an ART user writes it (`export.compact` of the backbone),
            ProjectedGradientDescent with the same settings, AdversarialTrainer with
            ratio 1.0 (every example of the batch replaced by its adversarial version,
            i.e. one PGD-k on the whole batch and one training pass: less work per step
            than our AT, which trains on both views)
  art_at_our_layers  (--art_our_layers) the same, over the zoo's backbone itself
            (its logits output; not a target)

Targets (ratios, this machine): at/standard step time <= 0.9 k + 1; anp_vs/at <= 1.2;
at/art_at throughput >= 4; anp_vs/art_at >= 3.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's per-batch progress bars

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf import attacks, data, export, kernels, models, precision
from anp_vs_tf.models.backbone import split_outputs
from anp_vs_tf.trainers import RobustModel, get_method
from timing import fit_window, interleaved_seconds, median_rate

CASES = {
    "lenet5_mnist": dict(model="lenet5_caffe", dataset="mnist", k=20, eps=0.3, step=0.01,
                         steps=5, windows=5),
    "vgg16_cifar10": dict(model="vgg16", dataset="cifar10", k=10, eps=0.03, step=0.007,
                          steps=1, windows=3, count_first=True),
}
BATCH = 128
OURS = ("standard", "at", "anp_vs")


def arrays(case, examples):
    images, labels, info = data.load_arrays(case["dataset"], "train", download=False)
    keep = data.class_balanced_subset(labels, examples, info["num_classes"])
    return images[keep].astype("float32") / 255.0, labels[keep].astype("int32"), info


def our_model(name, case, input_shape, classes, steps_per_execution=1, policy="float32", kernel_setting="auto"):
    """steps_per_execution > 1 runs that many steps per call of Keras' compiled function,
    which removes its per-step host work; it does not change what is computed
    (tests/test_robust_model.py)."""
    keras.utils.set_random_seed(0)
    method = get_method(name, beta_kl=4.0, lambda_vs=1e-3, num_train_examples=50000)
    with precision.dtype_policy(policy):
        backbone = models.build_model(case["model"], input_shape, classes, prunable=method.prunes)
    adversary = attacks.PGD(case["eps"], case["step"], case["k"]) if method.adversarial else None
    model = RobustModel(backbone, method, adversary=adversary, seed=0, kernels=kernel_setting)
    model.compile(keras.optimizers.Adam(1e-3),
                  mask_optimizer=keras.optimizers.Adam(1e-2) if method.prunes else None,
                  steps_per_execution=steps_per_execution)
    return model


def art_window(case, x, y, input_shape, classes, our_layers=False):
    """A `run_window` for ART's adversarial training: `steps` batches per trainer.fit call.

    our_layers: ART trains the zoo's backbone itself instead of its plain-Keras copy."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import TensorFlowV2Classifier

    keras.utils.set_random_seed(0)
    backbone = models.build_model(case["model"], input_shape, classes)
    if our_layers:
        logits, _ = split_outputs(backbone.output)
        network = keras.Model(backbone.input, logits)
    else:
        network = export.compact(backbone)  # the same weights in plain Keras layers, logits out
    classifier = TensorFlowV2Classifier(
        network, nb_classes=classes, input_shape=input_shape, clip_values=(0.0, 1.0),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=keras.optimizers.Adam(1e-3),
    )
    pgd = ProjectedGradientDescent(classifier, norm=np.inf, eps=case["eps"], eps_step=case["step"],
                                   max_iter=case["k"], batch_size=BATCH, verbose=False)
    trainer = AdversarialTrainer(classifier, attacks=pgd, ratio=1.0)
    per_window = BATCH * case["steps"]
    windows = len(x) // per_window
    calls = iter(range(10**9))

    def run_window():
        part = slice((next(calls) % windows) * per_window, None)
        start = time.perf_counter()
        trainer.fit(x[part][:per_window], y[part][:per_window], nb_epochs=1, batch_size=BATCH)
        return time.perf_counter() - start

    return run_window


def run_case(name, case, one_execution_per_window=False, policy="float32", art_our_layers=False,
             kernel_settings=("auto",)):
    """Every run of the case, timed window by window in turn (see timing.py)."""
    per_window = BATCH * case["steps"]
    x, y, info = arrays(case, per_window * (case["windows"] + 1))
    input_shape, classes = tuple(info["input_shape"]), info["num_classes"]
    dataset = (tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(BATCH, drop_remainder=True)
               .prefetch(tf.data.AUTOTUNE))
    per_execution = case["steps"] if one_execution_per_window else 1
    def window(method, setting="auto"):
        return fit_window(our_model(method, case, input_shape, classes, per_execution, policy, setting), dataset,
                          case["steps"], count_first=case.get("count_first", False))

    runs = {method: window(method) for method in OURS}
    for setting in kernel_settings:
        if setting != "auto":
            runs.update({f"{method}[{setting}]": window(method, setting) for method in OURS if method != "standard"})
    runs["art_at"] = art_window(case, x, y, input_shape, classes)
    if art_our_layers:
        runs["art_at_our_layers"] = art_window(case, x, y, input_shape, classes, our_layers=True)
    seconds = interleaved_seconds(runs, case["windows"])
    rates = {method: median_rate(s, per_window) for method, s in seconds.items()}
    for method, rate in rates.items():
        print(f"  {name} {method:14s} {rate:8.1f} examples/s", flush=True)
    k = case["k"]
    ratios = {
        "at_over_standard_step_time": rates["standard"] / rates["at"],
        "at_over_standard_target": 0.9 * k + 1,
        "anp_vs_over_at_step_time": rates["at"] / rates["anp_vs"],
        "anp_vs_over_at_target": 1.2,
        "at_over_art_throughput": rates["at"] / rates["art_at"],
        "at_over_art_target": 4.0,
        "anp_vs_over_art_throughput": rates["anp_vs"] / rates["art_at"],
        "anp_vs_over_art_target": 3.0,
    }
    if art_our_layers:
        ratios["at_over_art_our_layers_throughput"] = rates["at"] / rates["art_at_our_layers"]
    if "at[keras]" in rates:
        ratios.update({
            "keras_at_over_standard_step_time": rates["standard"] / rates["at[keras]"],
            "keras_anp_vs_over_at_step_time": rates["at[keras]"] / rates["anp_vs[keras]"],
            "keras_at_over_art_throughput": rates["at[keras]"] / rates["art_at"],
            "keras_anp_vs_over_art_throughput": rates["anp_vs[keras]"] / rates["art_at"],
            "auto_over_keras_at_throughput": rates["at"] / rates["at[keras]"],
        })
    return {"settings": case, "kernels": list(kernel_settings), "cpu_family": kernels.cpu_family(),
            "batch": BATCH, "steps_per_execution": per_execution, "our_policy": policy,
            "examples_per_s": rates, "ratios": ratios,
            "window_seconds": {m: s.tolist() for m, s in seconds.items()}}


def table(results):
    extra = "art_at_our_layers" in next(iter(results.values()))["examples_per_s"]
    lines = ["| case | standard | AT | ANP-VS | ART AT | AT/std step (≤ 0.9k+1) | ANP-VS/AT step (≤ 1.2) "
             "| AT/ART (≥ 4) | ANP-VS/ART (≥ 3) |" + (" ART AT, our layers | AT/that |" if extra else ""),
             "| --- " * (11 if extra else 9) + "|"]
    for name, result in results.items():
        r, q = result["examples_per_s"], result["ratios"]

        def mark(value, target, below):
            ok = value <= target if below else value >= target
            return f"{value:.2f} {'✓' if ok else '✗'} ({target:g})"

        lines.append(
            f"| {name} (k={result['settings']['k']}) | {r['standard']:.0f} | {r['at']:.0f} | {r['anp_vs']:.0f} "
            f"| {r['art_at']:.1f} | {mark(q['at_over_standard_step_time'], q['at_over_standard_target'], True)} "
            f"| {mark(q['anp_vs_over_at_step_time'], 1.2, True)} "
            f"| {mark(q['at_over_art_throughput'], 4.0, False)} "
            f"| {mark(q['anp_vs_over_art_throughput'], 3.0, False)} |"
            + (f" {r['art_at_our_layers']:.1f} | {q['at_over_art_our_layers_throughput']:.2f} |" if extra else "")
        )
        if "at[keras]" in r:
            lines.append(
                f"| {name}, kernels=keras | | {r['at[keras]']:.0f} | {r['anp_vs[keras]']:.0f} | "
                f"| {mark(q['keras_at_over_standard_step_time'], q['at_over_standard_target'], True)} "
                f"| {mark(q['keras_anp_vs_over_at_step_time'], 1.2, True)} "
                f"| {mark(q['keras_at_over_art_throughput'], 4.0, False)} "
                f"| {mark(q['keras_anp_vs_over_art_throughput'], 3.0, False)} |" + (" | |" if extra else ""))
    policy = next(iter(results.values()))["our_policy"]
    return "\n".join(lines) + (f"\n\n(examples/s, batch 128, median of the timed windows; ours in {policy}; "
                               "ART AT over plain Keras layers" + (", the last two columns over the zoo's)" if extra else ")"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--json", default="throughput.json", help="where the results go")
    parser.add_argument("--one_execution_per_window", action="store_true",
                        help="compile our runs with steps_per_execution = the window's steps")
    parser.add_argument("--kernels", default="auto,keras",
                        help='kernel settings of our AT and ANP-VS runs: "auto" (the targets), "keras", or both')
    parser.add_argument("--mixed_precision", action="store_true",
                        help="build our runs under Keras' mixed_bfloat16 policy (ART stays float32)")
    parser.add_argument("--art_our_layers", action="store_true",
                        help="also time ART over the zoo's own layers (not a target; adds ~40%% to the run)")
    args = parser.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    settings = args.kernels.split(",")
    if "auto" not in settings or not set(settings) <= set(kernels.SETTINGS):
        parser.error(f'--kernels must list "auto" and may add "keras", got {args.kernels!r}')
    try:
        import art  # noqa: F401
    except ImportError:
        parser.error("the comparison needs the Adversarial Robustness Toolbox: "
                     "pip install adversarial-robustness-toolbox")
    tf.get_logger().setLevel("ERROR")  # ART retraces its train step for every batch, and says so
    start = time.time()
    policy = precision.MIXED_POLICY if args.mixed_precision else "float32"
    results = {name: run_case(name, CASES[name], args.one_execution_per_window, policy, args.art_our_layers,
                              settings)
               for name in args.cases.split(",")}
    print(table(results))
    with open(args.json, "w") as f:
        json.dump({"results": results, "wall_time_s": time.time() - start}, f, indent=2)
    print(f"wall time {time.time() - start:.0f} s; results in {args.json}")


if __name__ == "__main__":
    main()
