"""Deploying a pruned model: `compact` removes the pruned units, `export` ships a SavedModel."""
from anp_vs_tf.export.compact import compact, has_masks
from anp_vs_tf.export.saved_model import SIGNATURE, export, export_file, serving_signature

__all__ = ["SIGNATURE", "compact", "export", "export_file", "has_masks", "serving_signature"]
