"""Counting the ONNX exports a piece of code makes (``engines.torch_to_onnx`` calls)."""

from __future__ import annotations

import pytest


def counted_exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class names of the modules exported from now on, in order, as a live list."""
    from pipeline.modeling import engines

    exports: list[str] = []
    real = engines.torch_to_onnx

    def counted(module, *args, **kwargs):
        exports.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(engines, "torch_to_onnx", counted)
    return exports
