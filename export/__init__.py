"""Export a trained MedIQA checkpoint to deployable runtimes, and prove the result is the same model.

- ``onnx.py``      torch → ONNX (2D, 3D and classifier graphs; card in the metadata)
- ``verify.py``    parity between any two backends on the same real inputs (raises past tolerance)
- ``quantize.py``  CPU int8 for onnxruntime, accepted only if the validation ranking is kept
- ``tensorrt.py``  ONNX → TensorRT engine with header and build cache
- ``samples.py``   real preprocessed images for parity, calibration and benchmarks
- ``pipeline.py``  ``export_model``: the orchestration ``mediqa export`` runs

Depends on ``engines`` only (never the reverse).
"""
