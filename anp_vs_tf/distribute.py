"""Running on several devices or machines: the strategy, and randomness that does not
depend on how many replicas share a batch.

Keras and `tf.distribute` do the distribution: variables are created under the
strategy's scope, `fit` splits each global batch across the replicas and all-reduces
the gradients. What this module adds is `replica_rows`: a random draw for a batch is
made for the whole global batch and each replica keeps its own rows, so a run on two
replicas sees the same noise as a run on one device with the same seed (the seeds
themselves are `anp_vs_tf.seeds`).
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

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


def step_logs_for_keras(logs):
    """The step's logs as Keras reduces them across replicas.

    Under MultiWorkerMirroredStrategy Keras averages each logged value over the
    replicas along axis 0, which a scalar does not have (keras-team/keras#20585):
    there, every value goes out as a vector of one.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs
