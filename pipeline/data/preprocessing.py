"""The evaluation-time preprocessing of a backbone, in one place and without torch.

``Preprocessing`` is derived from the backbone's definition (``backbones.py``) and is
stored in every checkpoint and in the ONNX file's metadata, so features, fine-tuning,
evaluation, export and the torch-free predictor all turn an image into the same array.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESIZE_POLICIES = {
    "squash": "resize the whole image to input_size x input_size, ignoring its aspect ratio",
    "center_crop": "resize the shorter side to resize_size, then center-crop input_size x input_size",
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize (``squash`` or ``center_crop``, see RESIZE_POLICIES), scale to [0, 1], normalise.

    ``squash`` keeps the whole picture: on Caltech-101 a logistic regression on Lite0
    features scored 95.2% with it against 93.9% (crop of the full shorter side) and 93.2%
    (timm's 0.875 center crop), bf16 features, our 70/10/20 split.
    """

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "center_crop"

    def __post_init__(self) -> None:
        for name in ("input_size", "resize_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                raise ValueError(f"{name} must be three numbers (R, G, B), not {values!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, not {self.std!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {sorted(RESIZE_POLICIES)}")

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_policy": RESIZE_POLICIES[self.resize],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        fields = {k: v for k, v in data.items() if k != "resize_policy"}
        return cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: an ``input_size`` square, by this policy."""
        if self.resize == "squash":
            size = (self.input_size, self.input_size)
            return img if img.size == size else img.resize(size, _RESAMPLE[self.interpolation])
        width, height = img.size
        scale = self.resize_size / min(width, height)
        size = (
            max(self.input_size, round(width * scale)),
            max(self.input_size, round(height * scale)),
        )
        if size != img.size:
            img = img.resize(size, _RESAMPLE[self.interpolation])
        left = (size[0] - self.input_size) // 2
        top = (size[1] - self.input_size) // 2
        return img.crop((left, top, left + self.input_size, top + self.input_size))

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB → CHW float32 normalised with this backbone's mean and std."""
        arr = rgb.astype(np.float32) * (1.0 / 255.0)
        arr -= np.asarray(self.mean, dtype=np.float32)
        arr /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """An RGB image (``images.load_rgb``) → the model's CHW float32 input."""
        return self.normalise(np.asarray(self.resize_crop(img), dtype=np.uint8))
