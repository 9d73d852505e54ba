"""What the paper measures: vulnerability of latent features and model complexity."""
from anp_vs_tf.metrics.complexity import Complexity, LayerComplexity, complexity
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
    "complexity",
    "FeatureVulnerability",
    "example_vulnerability",
    "feature_vulnerability",
    "layer_vulnerability",
    "network_vulnerability",
]
