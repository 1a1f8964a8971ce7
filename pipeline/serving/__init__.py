"""Using an exported model without torch: the ONNX classifier and ``python -m pipeline
predict``. Imports only onnxruntime, numpy, Pillow and ``pipeline.data``."""
