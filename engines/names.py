"""Tensor names at the model boundary, shared by models, export and backends (torch-free)."""

IMAGES = "images"            # (N, 3, S, S) float32, normalised with the card's mean/std
VOLUMES = "volumes"          # (N, K, 3, S, S) float32
PROMPT = "prompt"            # (N, P) float32, concatenated one-hot groups
SCORE = "score"              # (N,) float32, in the model's [0, 1] label scale
SLICE_LOGIT = "slice_logit"  # (N,) float32, fusion logit of each 2D input treated as a slice
SLICE_SCORES = "slice_scores"    # (N, K)
SLICE_WEIGHTS = "slice_weights"  # (N, K), softmax over K
CLASSIFIER_OUTPUTS = ("modality", "region", "type")
