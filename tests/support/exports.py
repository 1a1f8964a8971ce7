"""Counting the calls a piece of code makes: ONNX exports (``engines.torch_to_onnx``) or any
other function, to show that work was reused rather than done again."""

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


def counted_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[tuple]:
    """The arguments of each call of ``module.name`` from now on, as a live list."""
    calls: list[tuple] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
