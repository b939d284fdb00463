"""Physics-based synthetic corpus (``mediqa synth``): real anatomy from PyPI packages, degraded
by simulated acquisition physics with known severity, written as DICOM / NIfTI / PNG / JPEG with a
manifest. ``sources`` (base images and splits), ``degrade`` (physics), ``writers`` (file formats),
``corpus`` (plan, render, manifest, synthetic score)."""

from training.synth.corpus import SIZES, generate_corpus, plan_corpus, quality_score

__all__ = ["SIZES", "generate_corpus", "plan_corpus", "quality_score"]
