"""Small real ONNX classifiers with this pipeline's metadata, built in milliseconds: the
mean colour of an 8x8 image times a weight matrix. On ``colour_images`` (red, green, blue)
the plain one is right on every image; a permuted one is wrong on every image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 8
CHANNELS = ("red", "green", "blue")
PREPROCESSING = {
    "input_size": SIZE,
    "resize_size": SIZE,
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
    "interpolation": "bilinear",
    "resize": "squash",
}


def colour_model(
    path: Path,
    classes: Sequence[str] = CHANNELS,
    scale: float = 1.0,
    permute: int = 0,
    pad_bytes: int = 0,
    seed: int = 0,
) -> Path:
    """Class ``classes[i]`` scores channel ``CHANNELS.index(classes[i])``'s mean times
    ``scale`` (a class named otherwise scores 0); ``permute`` rolls the classes' columns, so
    each colour gets another colour's name. ``pad_bytes`` of random metadata make the
    file larger (a longer write); ``seed`` makes it a distinct file."""
    weights = np.zeros((3, len(classes)), dtype=np.float32)
    for j, name in enumerate(classes):
        if name in CHANNELS:
            weights[CHANNELS.index(name), j] = scale
    weights = np.roll(weights, permute, axis=1)
    initializers = [numpy_helper.from_array(weights, "weights")]
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["colour"]),
            helper.make_node("MatMul", ["colour", "weights"], ["logits"]),
        ],
        "colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes)])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in {
        "classes": json.dumps(list(classes)),
        "preprocessing": json.dumps(PREPROCESSING),
        "temperature": "1.0",
        "params_sha256": f"{seed:064x}",
        "git_commit": "test",
        # bytes that change nothing the model computes (an unused initializer would be
        # dropped, with a warning, by onnxruntime)
        "padding": np.random.default_rng(seed).bytes(pad_bytes // 2).hex(),
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def rolled(source: Path, target: Path, shift: int = 1) -> Path:
    """``source`` (any exported classifier) with its logits' columns rolled by ``shift``
    after the graph: each class's score goes to another class, every other byte as it was."""
    model = onnx.load(str(source))
    output = model.graph.output[0].name
    inner = f"{output}_before_roll"
    for node in model.graph.node:
        node.output[:] = [inner if name == output else name for name in node.output]
    classes = len(json.loads({p.key: p.value for p in model.metadata_props}["classes"]))
    order = np.roll(np.arange(classes, dtype=np.int64), shift)
    model.graph.initializer.append(numpy_helper.from_array(order, "roll_order"))
    model.graph.node.append(helper.make_node("Gather", [inner, "roll_order"], [output], axis=1))
    onnx.save(model, str(target))
    return target
