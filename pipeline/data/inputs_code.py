"""The digest of the code that turns an image file into a model's input tensor.

Every output kept by content for reuse (the PyTorch reference features, the int8
calibrations, the ONNX backbone outputs onnx_check keeps) is keyed by it: an edit to the
decoding or the preprocessing computes them again.
"""

from __future__ import annotations

import hashlib
import inspect

from pipeline.data import images, preprocessing


def inputs_code_digest() -> str:
    """sha256 of ``images.py`` and ``preprocessing.py`` as they are imported."""
    code = "".join(inspect.getsource(m) for m in (images, preprocessing))
    return hashlib.sha256(code.encode()).hexdigest()
