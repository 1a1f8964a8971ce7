"""Figures about a run: test scoring, the significance tests behind onnx_check's bounds,
the headline rows, and the run report's charts and template."""
