"""Which faster kernels a traced step uses: chosen for the device at hand, never saved.

The package's models are plain Keras layers. Some passes of an attack step run faster
on a CPU when rewritten (`few_channel_conv`, `same_conv`, PGD's concurrent chunks);
whether a rewrite pays off depends on the device, its instruction set and the dtype,
and on a GPU, a TPU or under XLA the compiler's own kernels are the right ones. So, as
Keras' `LSTM(use_cudnn="auto")` picks cuDNN when it is traced, `choose()` decides when
a step is traced:

    kernels="keras"  plain Keras / TensorFlow ops everywhere;
    kernels="auto"   a rewrite only where it was checked equal to the plain computation
                     and measured faster: a CPU, not inside an XLA cluster, oneDNN on,
                     the instruction-set family and dtype of `MEASURED`. Elsewhere
                     (GPU, TPU, XLA, an unmeasured CPU) the same as "keras".

A `KernelChoice` given instead of a setting is used as it is, on any device: for the
benchmarks that measure each rewrite, and for tests.

`use(kernels)` sets the setting for the calls traced inside it (a `RobustModel` wraps
its steps in it), so an attack called there follows the model's setting.
"""

import contextlib
import dataclasses
import functools
import os
import threading

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

SETTINGS = ("auto", "keras")


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The rewrites one traced step uses; all off is plain Keras."""

    few_channel_conv: bool = False  # the image's conv: col2im input gradient (few_channel_conv)
    conv_relu_pool: bool = False  # ... and its ReLU and 2x2 max-pool in one (few_channel_conv)
    same_conv: bool = False  # stride-1 'same' convs: forward-conv input gradient, 2x2 maps by matmul
    attack_chunks: int = 1  # PGD attacks the batch as this many concurrent loops
    own_gradient_function: bool = False  # each attack step's gradient in a non-inlined function


PLAIN = KernelChoice()

# (instruction-set family, compute dtype) -> the choice measured faster there
# (benchmarks/kernel_choice.py and throughput.py; benchmarks/README.md says where and when).
MEASURED = {
    # AMD EPYC (Zen 3), 2 cores, 2026-11-29: each rewrite 1.1-2x on its part of the step,
    # but the image conv's col2im gradient alone, which tied oneDNN on LeNet-5's conv1
    # (conv_relu_pool replaces it there) and lost on VGG-16's (17.9 against 10.9 ms).
    ("avx2", "float32"): KernelChoice(conv_relu_pool=True, same_conv=True, attack_chunks=2,
                                      own_gradient_function=True),
    # Not ("avx512", ...): on an Intel Xeon with AVX-512/AMX, 2 cores, 2026-12-02, no
    # rewrite was faster than plain Keras from one run to the next (LeNet-5 PGD-20: conv1+
    # ReLU+pool1 and 2 chunks 0.79x in one run, 0.97-0.99x in the next; VGG-16 PGD-10: all
    # within 0.91-0.95x of a plain median whose traces ranged 6.5-8.7 s).
}


def _validate(kernels):
    if not isinstance(kernels, KernelChoice) and kernels not in SETTINGS:
        raise ValueError(f"kernels must be one of {SETTINGS}, got {kernels!r}.")
    return kernels


_active = threading.local()


@contextlib.contextmanager
def use(kernels):
    """Calls traced inside use this setting ("auto", "keras" or a KernelChoice) unless told otherwise."""
    _validate(kernels)
    previous = getattr(_active, "setting", "auto")
    _active.setting = kernels
    try:
        yield
    finally:
        _active.setting = previous


def active_setting():
    return getattr(_active, "setting", "auto")


@functools.cache
def cpu_family():
    """"avx512", "avx2" or "other": the x86-64 vector extensions of this machine's CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return "other"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def onednn_enabled():
    """oneDNN's CPU kernels are on unless TF_ENABLE_ONEDNN_OPTS is 0 (TensorFlow's default on x86)."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")


def in_xla():
    """True while tracing inside an XLA cluster (a jit_compile=True function)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _on_cpu():
    """True if the ops traced now run on a CPU: no GPU or TPU is the default device."""
    if not tf.distribute.has_strategy():
        return not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU")
    strategy = tf.distribute.get_strategy()
    if "TPU" in type(strategy).__name__:
        return False
    try:
        devices = strategy.extended.worker_devices
    except (AttributeError, NotImplementedError, RuntimeError):  # a strategy that does not say: plain ops
        return False
    return not any("GPU" in d.upper() or "TPU" in d.upper() for d in devices)


def choose(kernels=None, dtype=None):
    """The `KernelChoice` for ops traced now.

    kernels: "auto", "keras" or a KernelChoice; None takes the setting of the enclosing `use()`.
    dtype: the compute dtype of the layers rewritten; None takes Keras' global policy.
    """
    kernels = _validate(active_setting() if kernels is None else kernels)
    if isinstance(kernels, KernelChoice):
        return kernels
    if kernels == "keras" or in_xla() or not onednn_enabled() or not _on_cpu():
        return PLAIN
    dtype = tf.as_dtype(dtype or keras.config.dtype_policy().compute_dtype).name
    return MEASURED.get((cpu_family(), dtype), PLAIN)
