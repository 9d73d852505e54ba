"""Concurrent adversarial training and weight pruning by ADMM (Ye et al., ICCV 2019).

One `fit` runs three phases, driven by the method's own callback:

1. ADMM, the first `admm_fraction` of the epochs: adversarial training with the
   augmented-Lagrangian penalty (rho/2) sum_l ||W_l - Z_l + U_l||^2. After every epoch
   Z_l = projection of W_l + U_l onto the kernels with at most (1 - sparsity) * n_l
   nonzeros (keep the largest magnitudes), and U_l += W_l - Z_l.
2. Hard pruning at the end of the ADMM phase: each kernel keeps its largest
   (1 - sparsity) * n_l weights, the rest are set to zero and masked.
3. Masked adversarial retraining for the remaining epochs: after every step the
   pruned weights are set back to zero, so they stay zero.

The pruning is unstructured (individual weights), so it saves no FLOPs on dense
hardware: metrics.json reports it as `weight_sparsity_pct`.
"""

import keras
import tensorflow as tf

from anp_vs_tf.trainers.methods import Method, register

ADMM_PHASE, RETRAIN_PHASE = 0, 1


def keep_largest(values, sparsity):
    """A 0/1 mask keeping the largest-magnitude (1 - sparsity) fraction of `values`."""
    flat = tf.reshape(tf.abs(values), [-1])
    keep = max(1, int(round((1.0 - sparsity) * int(flat.shape[0]))))
    threshold = tf.math.top_k(flat, k=keep, sorted=True).values[-1]
    return tf.cast(tf.abs(values) >= threshold, values.dtype)


@keras.saving.register_keras_serializable(package="anp_vs_tf")
class Admm(Method):
    """ADMM pruning with adversarial training.

    Args:
        weight_sparsity: fraction of every kernel's weights to prune (0.8 for MNIST and
            0.75 for CIFAR in the paper's comparison).
        admm_rho: rho, the weight of the ADMM penalty.
        admm_fraction: fraction of the epochs spent in the ADMM phase; the rest retrains
            the hard-pruned network.
    """

    terms = Method.terms + ("admm_penalty",)
    prunes_weights = True

    def __init__(self, weight_sparsity=0.8, admm_rho=1e-2, admm_fraction=0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= weight_sparsity < 1.0:
            raise ValueError(f"weight_sparsity must be in [0, 1), got {weight_sparsity}.")
        if admm_rho < 0:
            raise ValueError(f"admm_rho must be >= 0, got {admm_rho}.")
        if not 0.0 <= admm_fraction <= 1.0:
            raise ValueError(f"admm_fraction must be in [0, 1], got {admm_fraction}.")
        self.weight_sparsity = float(weight_sparsity)
        self.admm_rho = float(admm_rho)
        self.admm_fraction = float(admm_fraction)

    def build(self, model):
        def like(kernel, value, name):
            return keras.Variable(
                tf.fill(kernel.shape, value), trainable=False, dtype=kernel.dtype,
                name=f"{kernel.path.replace('/', '_')}_{name}",
            )

        kernels = model.kernel_variables
        return {
            "z": [like(k, 0.0, "admm_z") for k in kernels],
            "u": [like(k, 0.0, "admm_u") for k in kernels],
            "mask": [like(k, 1.0, "admm_mask") for k in kernels],
            # -1 before training starts, then ADMM_PHASE, then RETRAIN_PHASE.
            "phase": keras.Variable(-1, trainable=False, dtype="int32", name="admm_phase"),
        }

    def losses(self, model, views, y):
        terms = super().losses(model, views, y)
        state = model.method_state
        penalty = tf.add_n([
            tf.reduce_sum(tf.square(w - z + u))
            for w, z, u in zip(model.kernel_variables, state["z"], state["u"])
        ])
        in_admm = tf.cast(tf.equal(state["phase"], ADMM_PHASE), penalty.dtype)
        terms["admm_penalty"] = penalty
        terms["loss"] = terms["loss"] + in_admm * 0.5 * self.admm_rho * penalty
        return terms

    def after_update(self, model):
        """Keep pruned weights at zero (the masks are all ones before hard pruning)."""
        pairs = list(zip(model.kernel_variables, model.method_state["mask"]))

        def apply_masks(strategy):
            for kernel, mask in pairs:
                strategy.extended.update(kernel, lambda v, m: v.assign(v * m), args=(mask,))

        context = tf.distribute.get_replica_context()
        if context is None:
            apply_masks(tf.distribute.get_strategy())
        else:
            context.merge_call(apply_masks)

    def callbacks(self, model):
        return [AdmmSchedule(self, model)]

    # -- the phase changes, run between epochs ----------------------------------------

    def update_duals(self, model):
        state = model.method_state
        for w, z, u in zip(model.kernel_variables, state["z"], state["u"]):
            z.assign((w + u) * keep_largest(w + u, self.weight_sparsity))
            u.assign(u + w - z)

    def hard_prune(self, model):
        state = model.method_state
        for w, mask in zip(model.kernel_variables, state["mask"]):
            mask.assign(keep_largest(w, self.weight_sparsity))
            w.assign(w * mask)
        state["phase"].assign(RETRAIN_PHASE)

    def get_config(self):
        return {
            **super().get_config(),
            "weight_sparsity": self.weight_sparsity,
            "admm_rho": self.admm_rho,
            "admm_fraction": self.admm_fraction,
        }


class AdmmSchedule(keras.callbacks.Callback):
    """Runs the ADMM phase changes between epochs (part of the method, added by fit)."""

    def __init__(self, method, model):
        super().__init__()
        self.method = method
        self.robust_model = model

    def _admm_epochs(self):
        total = getattr(self.robust_model, "planned_epochs", None) or self.params.get("epochs", 1)
        return int(round(self.method.admm_fraction * total))

    def on_train_begin(self, logs=None):
        state = self.robust_model.method_state
        if int(state["phase"].numpy()) == -1:
            for w, z, u in zip(self.robust_model.kernel_variables, state["z"], state["u"]):
                z.assign(w * keep_largest(w, self.method.weight_sparsity))
                u.assign(tf.zeros_like(u))
            state["phase"].assign(ADMM_PHASE)
            if self._admm_epochs() == 0:
                self.method.hard_prune(self.robust_model)

    def on_epoch_end(self, epoch, logs=None):
        if int(self.robust_model.method_state["phase"].numpy()) != ADMM_PHASE:
            return
        self.method.update_duals(self.robust_model)
        if epoch + 1 >= self._admm_epochs():
            self.method.hard_prune(self.robust_model)


register("admm", Admm, adversarial=True)
