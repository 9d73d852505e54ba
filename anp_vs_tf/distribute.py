"""Running on several devices or machines: the strategy, and randomness that does not
depend on how many replicas share a batch, nor on whether XLA compiles the step.

Keras and `tf.distribute` do the distribution: variables are created under the
strategy's scope, `fit` splits each global batch across the replicas and all-reduces
the gradients. What this module adds is `replica_rows`: a random draw for a batch is
made for the whole global batch and each replica keeps its own rows, so a run on two
replicas sees the same noise as a run on one device with the same seed. And the
stateless draws of the package's training and attack steps (`stateless_uniform`,
`fold_in`, `split`): the same numbers with and without XLA (`jit_compile=True`, Keras'
default on GPUs), and bit for bit the draws of TensorFlow's own CPU kernels.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# The Philox algorithm, named: with "auto_select" (the default of every
# tf.random.stateless_* op) XLA zero-extends a negative int32 seed word where
# TensorFlow's kernels sign-extend it, so half of all derived seeds gave another
# stream under XLA. With "philox" the key and counter are scrambled by graph ops, the
# same in both compilers, and on a CPU (or GPU) it is the stream "auto_select" picks.
ALG = "philox"


def make_strategy(name="default", devices=None):
    """The tf.distribute strategy called `name`.

    default: the current (single-device) strategy. mirrored: MirroredStrategy over
    `devices` (e.g. ["/gpu:0", "/gpu:1"]), all local GPUs by default.
    multi_worker: MultiWorkerMirroredStrategy, configured by the TF_CONFIG environment
    variable. tpu: TPUStrategy on the TPU named by TPU_NAME (or the local one).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices or None)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy=multi_worker needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
                '"task": {"type": "worker", "index": 0}}).'
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as error:
            raise ValueError(f"TF_CONFIG is not valid JSON ({error}).") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(os.environ.get("TPU_NAME", ""))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--strategy=tpu found no TPU ({first}).") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")


def is_chief():
    """Whether this process writes the run's files (always, unless a non-chief worker)."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    cluster = config.get("cluster", {})
    if not task:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def check_same_on_every_worker(value, what, remedy):
    """Raise ValueError unless the integer `value` is the same in every worker process."""
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    # Collectives offer SUM and MEAN only: every worker learns the same mean and spread.
    local = tf.constant(float(value), tf.float64)
    mean = strategy.reduce("MEAN", strategy.run(tf.function(lambda: tf.identity(local))), axis=None)
    spread = strategy.reduce("SUM", strategy.run(tf.function(lambda: tf.square(local - mean))), axis=None)
    if float(spread) > 0:
        raise ValueError(f"{what} differs between workers (here {value}, mean {float(mean):g}): {remedy}.")


def replica_rows(sample, rows):
    """`sample(n)` draws n rows; return this replica's `rows` rows of a global draw.

    On one device this is simply `sample(rows)`. On R replicas each replica draws the
    R * rows rows of the global batch and keeps its slice, so the noise an example gets
    does not depend on the replica count (the extra draws are cheap next to the step).
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    if replicas == 1:
        return sample(rows)
    everything = sample(rows * replicas)
    start = tf.cast(context.replica_id_in_sync_group, tf.int32) * rows
    return everything[start:start + rows]


# -- stateless draws that XLA makes alike --------------------------------------------


def stateless_uniform(shape, seed, minval=0.0, maxval=1.0, dtype=tf.float32):
    """`tf.random.stateless_uniform(shape, seed, minval, maxval)` (float32), the same under XLA.

    Bit for bit the draw of TensorFlow's kernel without XLA, on any seed: the Philox
    words (`ALG`, so a negative seed word is read alike) are made into floats in
    [0, 1) as that kernel does, of the LOW 23 bits (XLA's own op takes the high 23,
    another draw altogether), then scaled as `tf.random.stateless_uniform` does:
    u * (maxval - minval) + minval in float32, two roundings. XLA's CPU backend
    contracts a multiply-add into one fused multiply-add, one rounding (1 ulp off for
    about half the draws unless maxval - minval is a power of two), so the product is
    multiplied by a 1.0 XLA cannot fold away: the multiply-add XLA may fuse is then
    (u * (maxval - minval)) * 1 + minval, exact in its product, fused or not.

    Gaussian draws (`tf.random.stateless_normal`) are not reproduced: TensorFlow's
    kernel makes them by Box-Muller with the C library's logf and sincosf, which
    TensorFlow's (Eigen's) and XLA's log, sin and cos do not match to the bit, so an
    XLA step still draws other Gaussian noise (PGD's Gaussian and L2 starts, the
    Bayesian layers' weights).
    """
    if tf.as_dtype(dtype) != tf.float32:
        raise ValueError(f"stateless_uniform draws float32 only, got dtype {dtype}.")
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32, alg=ALG)
    mantissa = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFF, tf.uint32))
    one_to_two = tf.bitcast(tf.bitwise.bitwise_or(mantissa, tf.constant(0x3F800000, tf.uint32)), tf.float32)
    unit = one_to_two - 1.0
    minval = tf.convert_to_tensor(minval, tf.float32)
    maxval = tf.convert_to_tensor(maxval, tf.float32)
    one = 0.0 * unit + 1.0  # exactly 1, but not a constant XLA can fold away
    return unit * (maxval - minval) * one + minval


def fold_in(seed, data):
    """`tf.random.experimental.stateless_fold_in` with `ALG`: the same seed under XLA,
    also from a seed with a negative word (bit for bit the default's on a CPU)."""
    return tf.random.experimental.stateless_fold_in(seed, data, alg=ALG)


def split(seed, n=2):
    """`tf.random.experimental.stateless_split(seed, n)` with `ALG`, shape [n, 2]: the same
    seeds under XLA (bit for bit the default's on a CPU, and `tfp.random.split_seed`'s
    for an int32 seed, stacked)."""
    return tf.random.experimental.stateless_split(seed, n, alg=ALG)
