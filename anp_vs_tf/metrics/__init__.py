"""What the paper measures: vulnerability of latent features and model complexity."""
from anp_vs_tf.metrics.autoattack import autoattack_evaluation
from anp_vs_tf.metrics.complexity import Complexity, LayerComplexity, complexity
from anp_vs_tf.metrics.gradient_masking import gradient_masking_checks
from anp_vs_tf.metrics.robustness import attack_evaluation
from anp_vs_tf.metrics.vulnerability import (
    FeatureVulnerability,
    example_vulnerability,
    feature_vulnerability,
    layer_vulnerability,
    network_vulnerability,
)

__all__ = [
    "Complexity",
    "LayerComplexity",
    "attack_evaluation",
    "autoattack_evaluation",
    "complexity",
    "FeatureVulnerability",
    "example_vulnerability",
    "feature_vulnerability",
    "gradient_masking_checks",
    "layer_vulnerability",
    "network_vulnerability",
]
