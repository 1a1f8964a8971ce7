"""ONNX graphs joined and split at a named tensor, without torch.

export joins the kept backbone graph to the head's at ``FEATURES`` (and engines join the
normalisation to the backbone); int8 calibration and onnx_check split an exported file
there again, to reuse what its backbone part computed.
"""

from __future__ import annotations

import onnx
import onnx.compose
import onnx.utils


def joined(
    first: onnx.ModelProto, second: onnx.ModelProto, link: str, prefixes: tuple[str, str]
) -> onnx.ModelProto:
    """One graph: ``first``, whose output ``link`` feeds ``second``'s input of that name;
    each part's inner names take its prefix, so they cannot clash."""
    proto = onnx.compose.merge_models(
        onnx.compose.add_prefix(first, prefixes[0], rename_inputs=False, rename_outputs=False),
        onnx.compose.add_prefix(second, prefixes[1], rename_inputs=False, rename_outputs=False),
        io_map=[(link, link)],
        producer_name=first.producer_name,
        producer_version=first.producer_version,
    )
    opsets = {o.domain: o.version for o in [*first.opset_import, *second.opset_import]}
    del proto.opset_import[:]  # merge_models lists each domain once per part
    proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    return proto


def split(proto: onnx.ModelProto, at: str) -> tuple[onnx.ModelProto, onnx.ModelProto] | None:
    """``proto`` as the part from its inputs to the tensor ``at`` and the part from ``at``
    to its outputs; None when no node produces ``at``."""
    if at not in {name for node in proto.graph.node for name in node.output}:
        return None
    inputs, outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    parts = onnx.utils.Extractor(proto)  # infers the shapes once, for both parts
    return parts.extract_model(inputs, [at]), parts.extract_model([at], outputs)
