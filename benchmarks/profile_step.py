"""Where the time of an adversarial training step goes: a decomposition, in one run.

    python benchmarks/profile_step.py [--model lenet5_caffe] [--k 20] [--batch 128] [--trace DIR]
        [--mixed_precision] [--ops]

Times (median of --repeats compiled calls, after warm-up) of: a standard step; the
AT and ANP-VS steps; the same steps with a 0-step attack (what training costs beside
the attack); PGD-k alone; one input-gradient pass (one attack step) and one forward
pass of the deterministic network; and the first convolution's input gradient (the op
an attack needs and training does not). --trace DIR also records a TensorFlow profiler
trace of a few AT steps for TensorBoard's profile plugin; --ops prints that trace's time
per op type (summed over the executor's threads, so ops that overlap count twice).
--mixed_precision builds the models under Keras' mixed_bfloat16 policy.
"""

import argparse
import collections
import glob
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from anp_vs_tf import attacks, models, precision
from anp_vs_tf.models.folding import folded_logits
from anp_vs_tf.trainers import RobustModel, get_method

INPUTS = {"lenet5_caffe": ((28, 28, 1), 10), "lenet_300_100": ((28, 28, 1), 10), "vgg16": ((32, 32, 3), 10)}


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def robust_model(name, args, steps):
    keras.utils.set_random_seed(0)
    method = get_method(name, beta_kl=4.0, lambda_vs=1e-3, num_train_examples=60000)
    shape, classes = INPUTS[args.model]
    with precision.dtype_policy(precision.MIXED_POLICY if args.mixed_precision else "float32"):
        backbone = models.build_model(args.model, shape, classes, prunable=method.prunes)
    adversary = attacks.PGD(args.eps, args.step, steps) if method.adversarial else None
    model = RobustModel(backbone, method, adversary=adversary, seed=0)
    model.compile(keras.optimizers.Adam(1e-3),
                  mask_optimizer=keras.optimizers.Adam(1e-2) if method.prunes else None)
    return model


def op_times(trace_dir, steps):
    """[(op type, ms per step)] from the newest profiler trace under trace_dir, largest first."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow's own trace format

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's threads run the ops
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name  # "op name:OpType"
                op_type = name.rsplit(":", 1)[-1]
                if ":" in name and op_type != "Process":  # "Process": the executor's own span
                    totals[op_type] += event.duration_ps / 1e9 / steps
    return totals.most_common()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5_caffe", choices=sorted(INPUTS))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trace", help="write a TensorFlow profiler trace of 5 AT steps here")
    parser.add_argument("--ops", action="store_true", help="print the trace's time per op type")
    parser.add_argument("--mixed_precision", action="store_true", help="compute in bfloat16 (mixed_bfloat16)")
    args = parser.parse_args()
    if args.ops and not args.trace:
        args.trace = tempfile.mkdtemp(prefix="profile_step_")
    shape, classes = INPUTS[args.model]
    x = tf.random.stateless_uniform((args.batch,) + shape, [0, 1])
    y = tf.random.stateless_uniform((args.batch,), [0, 2], 0, classes, tf.int32)
    seed = tf.constant([1, 2])
    rows = {}

    def step(model):
        return tf.function(lambda: model.train_step((x, y)))

    rows["standard step"] = median_ms(step(robust_model("standard", args, 0)), args.repeats)
    for name in ("at", "anp_vs"):
        model = robust_model(name, args, args.k)
        rows[f"{name} step (PGD-{args.k})"] = median_ms(step(model), args.repeats)
        rows[f"{name} step, 0-step attack"] = median_ms(step(robust_model(name, args, 0)), args.repeats)
        rows[f"{name}: PGD-{args.k} alone"] = median_ms(tf.function(lambda: model.attack(x, y, seed=seed)),
                                                         args.repeats)
        # What the attack differentiates: masks folded into the weights (models.folding).
        logits = folded_logits(model.backbone) if model.mask_layers else model.inference_logits
        rows[f"{name}: one attack step (input gradient)"] = median_ms(
            tf.function(lambda: model.adversary._gradient(logits, x, y)), args.repeats)
        rows[f"{name}: one forward pass"] = median_ms(tf.function(lambda: model.inference_logits(x)),
                                                      args.repeats)
        if name == "at" and args.trace:
            train = step(model)
            train()
            tf.profiler.experimental.start(args.trace)
            for _ in range(5):
                train()
            tf.profiler.experimental.stop()
            if args.ops:
                ops = op_times(args.trace, 5)

    conv = next(l for l in robust_model("standard", args, 0).backbone.layers
                if isinstance(l, keras.layers.Conv2D))
    out_shape = conv.compute_output_shape((args.batch,) + shape)
    grad = tf.random.stateless_normal(out_shape, [0, 3])

    def conv_input_gradient():
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=(args.batch,) + shape, filter=conv.kernel, out_backprop=grad,
            strides=(1,) + tuple(conv.strides) + (1,), padding=conv.padding.upper())

    rows[f"{conv.name}: input gradient op"] = median_ms(tf.function(conv_input_gradient), args.repeats)
    rows[f"{conv.name}: forward op"] = median_ms(
        tf.function(lambda: tf.nn.conv2d(x, conv.kernel, conv.strides, conv.padding.upper())), args.repeats)

    width = max(map(len, rows))
    dtype = "bfloat16" if args.mixed_precision else "float32"
    print(f"{args.model}, batch {args.batch}, PGD-{args.k}, {dtype}: median ms")
    for name, ms in rows.items():
        print(f"  {name:{width}s} {ms:9.2f}")
    if args.ops:
        print(f"AT step, ms per step by op type, summed over threads ({args.trace}):")
        for op, ms in ops[:20]:
            print(f"  {op:{width}s} {ms:9.2f}")


if __name__ == "__main__":
    main()
