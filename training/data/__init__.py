"""Datasets, label sources, splits and the preprocessed-input cache used by training."""
