"""Stateless random seeds and draws: reproducible, and the same with and without XLA.

Every random number of a training or attack step comes from a stateless seed (two
int32 words) derived from the run's seed, the optimizer step and a stream number, so a
run restored from a checkpoint draws again what it drew. These helpers are the one way
the package makes and splits such seeds and draws uniform noise from them: the same
numbers with and without XLA (`jit_compile=True`, Keras' default on GPUs), and bit for
bit the draws of TensorFlow's own CPU kernels.
"""

import tensorflow as tf

# The Philox algorithm, named: with "auto_select" (the default of every
# tf.random.stateless_* op) XLA zero-extends a negative int32 seed word where
# TensorFlow's kernels sign-extend it, so half of all derived seeds gave another
# stream under XLA. With "philox" the key and counter are scrambled by graph ops, the
# same in both compilers, and on a CPU (or GPU) it is the stream "auto_select" picks.
ALG = "philox"


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


def int32_seed(seed):
    """Any integer seed tensor (int64 from a `keras.random.SeedGenerator`, an optimizer's
    iteration count) as the int32 words a stateless op takes, in [0, 2**31 - 1)."""
    return tf.cast(tf.math.floormod(seed, 2**31 - 1), tf.int32)


def attack_seed(seed=None):
    """An attack's stateless seed as int32 words: the one given, or a fresh random one
    when the caller passed None (then the run is not reproducible, by request)."""
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    return tf.cast(seed, tf.int32)
