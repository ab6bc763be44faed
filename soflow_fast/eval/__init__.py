"""Sample-quality evaluation without FID: set distances with known answers and a digits classifier."""

from soflow_fast.eval.metrics import (
    METRICS,
    DigitsClassifier,
    DigitsFeatureExtractor,
    compare_sets,
    default_cache_dir,
    digits_feature_extractor,
    digits_label_accuracy,
    energy_distance,
    frechet_digits_distance,
    frechet_distance,
    frechet_distance_from_stats,
    mmd_rbf,
    sliced_wasserstein2,
    train_digits_classifier,
)

__all__ = [
    "METRICS",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "compare_sets",
    "default_cache_dir",
    "digits_feature_extractor",
    "digits_label_accuracy",
    "energy_distance",
    "frechet_digits_distance",
    "frechet_distance",
    "frechet_distance_from_stats",
    "mmd_rbf",
    "sliced_wasserstein2",
    "train_digits_classifier",
]
