"""Inference latency of the dense masked model against the compact SavedModel.

    python benchmarks/compact_latency.py [--model_path=runs/quickstart/model.keras]

Three networks, each timed at batch sizes 1 and 256 on this machine (all cores TF uses
by default), median wall time of one call after warm-up, the two models timed in
alternation so that drift in the machine's speed hits both alike:

  masked   `RobustModel.inference_logits` (every channel, masks E_q[pi] multiplied in)
           plus softmax, as a tf.function with the serving input signature;
  compact  `export()`'s SavedModel, loaded with tf.saved_model.load, serving_default.

Rows:
  lenet5   the trained ANP-VS LeNet-5-Caffe at --model_path.
  vgg16/lenet-ratios   an untrained (built, random weights) VGG-16 with masks whose keep
           ratios follow the LeNet's: each of the 13 conv mask layers keeps the mean of
           the LeNet's conv keep ratios (conv1, conv2), the two dense mask layers keep
           the LeNet's dense1 ratio.
  vgg16/paper-ratios   the same VGG-16 pruned to the paper's ANP-VS CIFAR-10 result:
           76.5% of units pruned and 2.41x fewer FLOPs. The paper gives only these
           totals, so the per-layer ratios are a geometric profile r_l = min(1, r_0 q^l)
           over the 15 mask layers (l = 0 conv1 ... 14 dense2: later, wider layers pruned
           more, as Beta-Bernoulli pruning does), with r_0 and q fitted so that
           complexity() gives both totals.
  resnet20/half   an untrained ResNet-20 (one mask per channel group, `make_prunable`)
           keeping half of every group: residual compaction, where the Adds get a
           Rescaling by the masks that a sum cannot take into a kernel.
Which units a VGG or ResNet layer keeps is drawn at random (seeded); latency depends only
on how many. Inputs are uniform random images. FLOPs speed-ups come from metrics.complexity.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf import attacks, models
from anp_vs_tf.trainers import load_robust_model
from anp_vs_tf.export import SIGNATURE, export
from anp_vs_tf.metrics import complexity
from anp_vs_tf.trainers import RobustModel, get_method

PAPER_PRUNED_PCT, PAPER_FLOPS_SPEEDUP = 76.5, 2.41
BATCH_SIZES = (1, 256)


# -- the models ------------------------------------------------------------------------


def keep_ratios(model):
    """Fraction of units each mask layer keeps, by layer name."""
    return {layer.name: int(layer.num_active()) / layer.units for layer in model.mask_layers}


def set_keep_ratios(model, ratios, seed=0):
    """Keep round(r * units) random units of each mask layer (at least one), prune the rest."""
    rng = np.random.default_rng(seed)
    for layer, ratio in zip(model.mask_layers, ratios):
        keep = max(1, int(round(ratio * layer.units)))
        a_uc = np.full(layer.units, -10.0, np.float32)  # E_q[pi] ~ 5e-5 < threshold: pruned
        a_uc[rng.choice(layer.units, keep, replace=False)] = np.log(np.expm1(layer.a_init))
        layer.a_uc.assign(a_uc)
        layer.b_uc.assign(np.full(layer.units, np.log(np.expm1(1.0)), np.float32))


def vgg16_with_masks(seed=0):
    keras.utils.set_random_seed(seed)
    return RobustModel(models.vgg16(prunable=True), get_method("anp", num_train_examples=50000),
                       adversary=attacks.PGD(0.03, 0.007, 1), seed=seed)


def resnet20_with_masks(seed=0):
    keras.utils.set_random_seed(seed)
    return RobustModel(models.resnet20(prunable=True), get_method("anp", num_train_examples=50000),
                       adversary=attacks.PGD(0.03, 0.007, 1), seed=seed)


def lenet_ratios_on_vgg(lenet, vgg):
    """Conv mask layers: mean of the LeNet's conv ratios; dense ones: the LeNet's dense ratio."""
    ratios = keep_ratios(lenet)
    conv = np.mean([r for name, r in ratios.items() if name.startswith("conv")])
    dense = np.mean([r for name, r in ratios.items() if name.startswith("dense")])
    return [conv if layer.name.startswith("conv") else dense for layer in vgg.mask_layers]


def _bisect(f, lo, hi, target, steps=30):
    """x in [lo, hi] with f(x) ~ target, f increasing."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def paper_ratios(vgg):
    """A geometric per-layer profile with the paper's pruned-unit share and FLOPs speed-up."""
    n = len(vgg.mask_layers)

    def profile(r0, q):
        return [min(1.0, r0 * q**l) for l in range(n)]

    def measure(r0, q):
        set_keep_ratios(vgg, profile(r0, q))
        return complexity(vgg.backbone)

    def r0_for(q):  # kept units rise with r0: match the pruned share
        return _bisect(lambda r0: 100 - measure(r0, q).sparsity_pct, 0.0, 20.0, 100 - PAPER_PRUNED_PCT, 18)

    # For a fixed pruned share, a steeper profile (smaller q) keeps more of the early, costly
    # layers: fewer FLOPs saved (2.0x at q = 0.6, 18x for a flat profile).
    q = _bisect(lambda q: measure(r0_for(q), q).flops_speedup, 0.6, 1.0, PAPER_FLOPS_SPEEDUP, 14)
    return profile(r0_for(q), q)


# -- timing ----------------------------------------------------------------------------


def masked_function(model):
    spec = tf.TensorSpec((None,) + tuple(model.backbone.input_shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def serve(images):
        logits = model.inference_logits(images)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    return lambda x: serve(x)


def compact_function(model, export_dir):
    export(model, export_dir, 1, verbose=False)
    signature = tf.saved_model.load(os.path.join(export_dir, "1")).signatures[SIGNATURE]
    return lambda x: signature(images=x)


def median_latencies(functions, x, budget_s):
    """Median seconds per call of each function, timed in alternation for about budget_s."""
    def once(f):
        start = time.perf_counter()
        f(x)["logits"].numpy()
        return time.perf_counter() - start

    for f in functions:
        for _ in range(3):
            once(f)
    per_round = sum(once(f) for f in functions)
    rounds = int(min(1000, max(7, budget_s / per_round)))
    times = [[] for _ in functions]
    for _ in range(rounds):
        for f, t in zip(functions, times):
            t.append(once(f))
    return [statistics.median(t) for t in times], rounds


def benchmark(name, model, tmp, budget_s):
    c = complexity(model.backbone)
    masked = masked_function(model)
    compact = compact_function(model, os.path.join(tmp, name.replace("/", "_")))
    shape = tuple(model.backbone.input_shape[1:])
    x = tf.random.stateless_uniform((8,) + shape, seed=(1, 2))
    diff = float(np.max(np.abs(masked(x)["logits"].numpy() - compact(x)["logits"].numpy())))
    rows = []
    for batch in BATCH_SIZES:
        x = tf.random.stateless_uniform((batch,) + shape, seed=(0, batch))
        (t_masked, t_compact), rounds = median_latencies([masked, compact], x, budget_s)
        rows.append(dict(
            model=name, batch=batch, masked_ms=1e3 * t_masked, compact_ms=1e3 * t_compact,
            speedup=t_masked / t_compact, flops_speedup=c.flops_speedup, pruned_pct=c.sparsity_pct,
            rounds=rounds, max_abs_logit_diff=diff,
        ))
        print(f"  {name} batch {batch}: masked {1e3 * t_masked:.3f} ms, compact {1e3 * t_compact:.3f} ms "
              f"({rounds} rounds)", flush=True)
    return rows


def format_table(rows):
    header = "| model | units pruned | batch | masked (ms) | compact (ms) | measured speed-up | FLOPs speed-up |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['pruned_pct']:.1f}% | {r['batch']} | {r['masked_ms']:.3f} | "
            f"{r['compact_ms']:.3f} | {r['speedup']:.2f}x | {r['flops_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def verdicts(rows):
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = {r["batch"]: r for r in rows if r["model"] == name}
        faster = all(r["speedup"] > 1 for r in mine.values())
        big = mine[max(mine)]
        half = big["speedup"] >= big["flops_speedup"] / 2
        out.append(f"{name}: compact faster at every batch size: {'yes' if faster else 'NO'}; "
                   f"batch {big['batch']} speed-up {big['speedup']:.2f}x >= half the FLOPs speed-up "
                   f"({big['flops_speedup'] / 2:.2f}x): {'yes' if half else 'NO'}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="runs/quickstart/model.keras")
    parser.add_argument("--budget_s", type=float, default=10.0,
                        help="seconds of timing per network and batch size (at least 7 rounds)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")  # fitting the paper profile retraces TFP helpers; harmless

    lenet = load_robust_model(args.model_path)
    vgg_lenet = vgg16_with_masks()
    set_keep_ratios(vgg_lenet, lenet_ratios_on_vgg(lenet, vgg_lenet))
    vgg_paper = vgg16_with_masks()
    set_keep_ratios(vgg_paper, paper_ratios(vgg_paper))
    resnet = resnet20_with_masks()
    set_keep_ratios(resnet, [0.5] * len(resnet.mask_layers))
    networks = {"lenet5": lenet, "vgg16/lenet-ratios": vgg_lenet, "vgg16/paper-ratios": vgg_paper,
                "resnet20/half": resnet}
    for name, model in networks.items():
        ratios = ", ".join(f"{k[:-4]} {v:.2f}" for k, v in keep_ratios(model).items())
        print(f"{name} keep ratios: {ratios}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in networks.items():
            rows.extend(benchmark(name, model, tmp, args.budget_s))
    print(f"\ncores: {os.cpu_count()}, TensorFlow {tf.__version__}; median of the rounds shown above\n")
    print(format_table(rows))
    print()
    print("\n".join(verdicts(rows)))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
