"""The PyTorch fp32 reference on the CPU: one pass over a split per model, kept by content.

onnx_check compares the ONNX files with the PyTorch model on the whole test split, and
evaluate scores the same model on the same images; running the backbone twice over them
cost a head experiment 41 s of its 113 s on Caltech-101. The reference is the model's
pooled backbone features, computed in fp32 on the CPU (channels_last, as evaluate runs
there), kept per image sha256 under a key of everything else that changes them: the
backbone's tensors byte for byte, the preprocessing and the code that applies it, and
torch's version. The logits are always ``head(features)``, which is what
``Classifier.forward`` computes, so a reused pass and a fresh one give the same numbers;
a head-only change (the backbone untouched) reuses the pass of the previous model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.featurestore import FeatureCache
from pipeline.data.inputs_code import inputs_code_digest
from pipeline.modeling.model import Classifier, ModelCard, load_head, part_state
from pipeline.modeling.tensors import tensors_digest
from pipeline.system import memo


def reference_key(card: ModelCard, state: dict[str, torch.Tensor]) -> str:
    """Everything but the image that changes the backbone's fp32 features."""
    spec = {
        "backbone": card.backbone,
        "tensors": tensors_digest(part_state(state, "backbone")),
        "preprocessing": card.preprocessing.to_dict(),
        "code": inputs_code_digest(),
        "torch": torch.__version__,
        "compute": "cpu fp32 channels_last",
    }
    return memo.digest(spec)


class ReferenceFeatures:
    """The stored fp32 backbone features of one checkpoint's backbone, by image sha256.

    Keyed from the checkpoint's tensors alone: the model (timm and its ~2 s of imports) is
    built, by ``build``, only when features are missing.
    """

    def __init__(
        self, root: Path, card: ModelCard, state: dict, build: Callable[[], Classifier]
    ) -> None:
        self.cache = FeatureCache(root, reference_key(card, state), memo.REFERENCE)
        self.head = load_head(card, state)
        self._build, self._backbone = build, None

    @property
    def backbone(self) -> torch.nn.Module:
        if self._backbone is None:
            model = self._build().to("cpu", memory_format=torch.channels_last).eval()
            self._backbone = model.backbone
        return self._backbone

    def lookup(self, shas: pd.Series) -> np.ndarray | None:
        """The features of every sha256 in order, or None when any is missing."""
        known = self.cache.load()
        if not all(sha in known for sha in shas):
            return None
        return np.stack([known[sha] for sha in shas]).astype(np.float32)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """One batch of preprocessed images through the backbone, fp32 on the CPU."""
        with torch.inference_mode():
            x = batch.to("cpu").contiguous(memory_format=torch.channels_last)
            return self.backbone(x).float().numpy()

    def keep(self, shas: pd.Series, features: np.ndarray) -> None:
        unique = ~pd.Series(list(shas)).duplicated().to_numpy()
        self.cache.add([s for s, u in zip(shas, unique, strict=True) if u], features[unique])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The model's fp32 logits from its backbone's features: ``Classifier.forward``'s head."""
        with torch.inference_mode():
            return self.head(torch.from_numpy(features)).float().numpy()

    def logits_over(self, shas: pd.Series, batches: Iterator[torch.Tensor]) -> np.ndarray:
        """The logits of ``shas`` (in order): stored features if all are there, else the
        backbone over ``batches`` (the same images, in the same order), then kept."""
        features = self.lookup(shas)
        if features is None:
            features = np.concatenate([self.embed(b) for b in batches])
            self.keep(shas, features)
        return self.logits(features)
