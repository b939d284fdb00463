"""Runtimes that execute MedIQA artifacts behind one ``Backend`` interface.

``open_backend(path)`` picks the runtime from the suffix (``auto.py``); each runtime lives in its own
module and is imported only when used (torch, onnxruntime, tensorrt).
"""

from engines.backends.auto import BACKENDS, backend_for, open_backend
from engines.backends.base import Backend, TensorSpec

__all__ = ["BACKENDS", "Backend", "TensorSpec", "backend_for", "open_backend"]
