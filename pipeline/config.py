"""params.yaml, read once into frozen, typed dataclasses.

Every key is checked at load time: an unknown key, a missing required key or a value
of the wrong type raises :class:`ConfigError` naming the dotted key (``split.ratios.val``),
with a suggestion when the key looks like a typo. Each stage then receives only the
sections it reads, the same ones dvc.yaml lists for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


@dataclass(frozen=True)
class Paths:
    """Every file and folder the stages share; dvc.yaml templates them as ``${paths.x}``."""

    downloads: Path = Path("data/downloads")
    raw: Path = Path("data/raw")
    manifest: Path = Path("data/manifest.parquet")
    splits: Path = Path("data/splits")
    metrics: Path = Path("metrics")
    quarantine: Path = Path("metrics/quarantine.csv")
    validation_docs: Path = Path("reports/validation")
    features: Path = Path("data/features")
    feature_cache: Path = Path("data/cache/features")
    head: Path = Path("models/head.pt")
    model: Path = Path("models/model.pt")
    checkpoints: Path = Path("models/checkpoints")
    calibration: Path = Path("models/calibration.json")
    plots: Path = Path("metrics/plots")
    evaluation: Path = Path("reports/evaluate")
    onnx: Path = Path("models/model.onnx")
    onnx_int8: Path = Path("models/model.int8.onnx")
    labels: Path = Path("models/labels.json")
    model_card: Path = Path("models/MODEL_CARD.md")
    report: Path = Path("reports/index.html")
    run_log: Path = Path("logs/stages")

    def under(self, root: Path) -> Paths:
        """These paths inside the workspace ``root`` (they are relative to it in params.yaml)."""
        return dataclasses.replace(
            self, **{f.name: Path(root) / getattr(self, f.name) for f in dataclasses.fields(self)}
        )

    def metrics_file(self, stage: str) -> Path:
        """``metrics/<stage>.json``: one name everywhere."""
        return self.metrics / f"{stage}.json"

    def split_file(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    def run_log_file(self, stage: str) -> Path:
        """``logs/stages/<stage>.json``: when the stage last ran and how long it took."""
        return self.run_log / f"{stage}.json"


@dataclass(frozen=True)
class DataParams:
    """Where the labelled images come from."""

    source: str = "builtin:digits-mini"
    sha256: str | None = None
    md5: str | None = None  # for publishers that give only an MD5 (Caltech's data repository)
    member: str | None = None
    exclude_classes: tuple[str, ...] = ("BACKGROUND_Google",)

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _is_hex(self.sha256, 64):
            raise ConfigError(f"data.sha256 must be 64 hex digits, got {self.sha256!r}")
        if self.md5 is not None and not _is_hex(self.md5, 32):
            raise ConfigError(f"data.md5 must be 32 hex digits, got {self.md5!r}")


@dataclass(frozen=True)
class DownloadParams:
    """How hard to try when fetching, and how much an archive may unpack to."""

    retries: int = 5
    timeout_s: float = 60.0
    max_extracted_bytes: int = 50_000_000_000
    max_files: int = 2_000_000


@dataclass(frozen=True)
class ValidateParams:
    """Bounds that the Great Expectations suite enforces on the manifest, and whether the
    set of classes may differ from the one the previous successful run accepted."""

    min_images_per_class: int = 5
    min_side: int = 16
    max_side: int = 20_000
    max_pixels: int = 89_478_485
    allow_class_change: bool = False


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"split.ratios.{name} must be between 0 and 1 (exclusive)")
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(f"split.ratios must sum to 1, got {total:g}")


@dataclass(frozen=True)
class SplitParams:
    """Stratified, stable train/val/test split."""

    ratios: SplitRatios = field(default_factory=SplitRatios)
    train_per_class: int | None = None
    seed: int = 42
    drop_small_classes: bool = False

    def __post_init__(self) -> None:
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError("split.train_per_class must be a positive integer or null")


@dataclass(frozen=True)
class ModelParams:
    """Which pretrained backbone to start from (see ``backbones.BACKBONES``)."""

    backbone: str = "efficientnet_lite0"
    weights: Literal["imagenet", "none"] = "imagenet"
    resize: Literal["squash", "center_crop"] = "squash"


Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation: RandomResizedCrop(scale_min..1), horizontal flip, colour jitter."""

    scale_min: float = 0.35
    flip: bool = True
    jitter: float = 0.2


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int = 32
    precision: Precision = "auto"
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    augmented_views: int = 0
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.augmented_views < 0 or self.batch_size < 1:
            raise ConfigError("features.augmented_views must be >= 0 and features.batch_size >= 1")


@dataclass(frozen=True)
class HeadParams:
    """A head trained on cached features: ``mlp`` (the seed's) or ``linear``."""

    type: Literal["mlp", "linear"] = "mlp"
    hidden: int = 1024
    dropout: float = 0.3
    lr: float | Literal["auto"] = 1e-3
    epochs: int = 100
    batch_size: int = 256
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    patience: int = 10
    class_balanced: bool = True
    seed: int = 0


@dataclass(frozen=True)
class FinetuneParams:
    """Backbone + trained head, last blocks (or all) unfrozen, discriminative learning rates.

    Defaults from Caltech-101 runs on the 2-core CPU, chosen on val (BENCHMARKS.md): all
    blocks at 0.3x a head lr of 2e-4 for 3 epochs, no label smoothing, mild augmentation,
    class-balanced loss: val 97.0% against the head's 96.8%. At lr 1e-3, or with smoothing
    0.1 and crops down to half the image, fine-tuning never caught up with the head on val.
    """

    epochs: int = 3
    unfreeze_blocks: int | Literal["all"] = "all"
    lr: float = 2e-4
    backbone_lr_mult: float = 0.3
    warmup_fraction: float = 0.1
    batch_size: int = 32
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    class_balanced: bool = True
    patience: int = 2
    precision: Precision = "auto"
    augment: AugmentParams = field(default_factory=lambda: AugmentParams(scale_min=0.9, jitter=0.0))
    seed: int = 0
    # A checkpoint inside an epoch every N batches (0: after each epoch only); a killed run
    # resumes at the last one exactly. Caltech on 2 CPU cores: 190 batches, ~5 min an epoch.
    checkpoint_every_steps: int = 50
    # Clip the gradients' total norm to this (null: no clipping). A non-finite norm stops
    # the stage either way, before the optimiser step.
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps < 0:
            raise ConfigError("finetune.checkpoint_every_steps must be >= 0 (0: per epoch only)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError("finetune.max_grad_norm must be > 0, or null for no clipping")


@dataclass(frozen=True)
class EvaluateParams:
    ece_bins: int = 15
    batch_size: int = 32
    precision: Precision = "auto"


@dataclass(frozen=True)
class ExportParams:
    """ONNX export; ``quantize`` adds a static int8 model calibrated on training images."""

    opset: int = 18
    quantize: bool = True
    calibration_images: int = 256
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ConfigError(
                "export.opset must be 17 or later (onnxruntime's well-supported range)"
            )
        if self.calibration_images < 1:
            raise ConfigError("export.calibration_images must be at least 1")


@dataclass(frozen=True)
class OnnxCheckParams:
    """Parity bounds between the ONNX and the PyTorch model, and how CPU speed is measured.

    The bounds on predictions (agreement, top-1 gap, int8 drop) are on true rates, tested
    one-sided at ``significance`` on the test split (pipeline/significance.py)."""

    threads: int = 2
    batch_size: int = 32
    latency_runs: int = 100
    throughput_batches: int = 10
    max_abs_diff: float = 1e-4
    min_top1_agreement: float = 0.999
    max_top1_gap: float = 0.002
    max_int8_drop: float = 0.01
    significance: float = 0.05

    def __post_init__(self) -> None:
        if min(self.threads, self.batch_size, self.latency_runs, self.throughput_batches) < 1:
            raise ConfigError(
                "onnx_check.threads, batch_size, latency_runs and throughput_batches must be >= 1"
            )
        if not 0 < self.significance < 1:
            raise ConfigError(
                f"onnx_check.significance must be between 0 and 1, got {self.significance!r}"
            )


@dataclass(frozen=True)
class ReportParams:
    """How much of the data the run report (``paths.report``) shows as pictures."""

    thumbnails_per_class: int = 4  # training images shown per class
    thumbnail_px: int = 96  # longest side of a thumbnail
    confused_pairs: int = 10  # most-confused class pairs shown with examples
    examples_per_pair: int = 4  # misclassified test images shown per pair
    max_listed_files: int = 200  # quarantined files / leaks listed; the rest are counted

    def __post_init__(self) -> None:
        if (
            min(self.thumbnail_px, self.max_listed_files) < 1
            or min(self.thumbnails_per_class, self.confused_pairs, self.examples_per_pair) < 0
        ):
            raise ConfigError(
                "report.thumbnail_px and max_listed_files must be >= 1, the counts >= 0"
            )


@dataclass(frozen=True)
class FlowsParams:
    """How the Prefect flow runs the DVC stages (read by ``flows/``, by no DVC stage)."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    timeouts_s: dict[str, float] = field(default_factory=lambda: {"default": 21600.0})
    download_retries: int = 3
    retry_delay_s: float = 30.0
    lock_timeout_s: float = 21600.0
    push: bool = False
    heartbeat_s: int = 60

    @property
    def zombie_after_s(self) -> int:
        """A run with no heartbeat for this long is marked Crashed (three missed beats)."""
        return 3 * self.heartbeat_s

    def __post_init__(self) -> None:
        if "default" not in self.timeouts_s:
            raise ConfigError("flows.timeouts_s needs a 'default' entry (seconds per stage)")
        if any(v <= 0 for v in self.timeouts_s.values()) or self.lock_timeout_s < 0:
            raise ConfigError("flows.timeouts_s values must be > 0 and lock_timeout_s >= 0")
        if len(self.cron.split()) != 5:
            raise ConfigError(f"flows.cron must have five fields, got {self.cron!r}")
        if self.heartbeat_s < 30:
            raise ConfigError(
                f"flows.heartbeat_s must be at least 30 (Prefect's minimum), got {self.heartbeat_s}"
            )

    def timeout_for(self, stage: str) -> float:
        return self.timeouts_s.get(stage, self.timeouts_s["default"])


@dataclass(frozen=True)
class Params:
    paths: Paths = field(default_factory=Paths)
    data: DataParams = field(default_factory=DataParams)
    download: DownloadParams = field(default_factory=DownloadParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    head: HeadParams = field(default_factory=HeadParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    onnx_check: OnnxCheckParams = field(default_factory=OnnxCheckParams)
    report: ReportParams = field(default_factory=ReportParams)
    flows: FlowsParams = field(default_factory=FlowsParams)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def _is_hex(value: str, digits: int) -> bool:
    return len(value) == digits and all(c in "0123456789abcdefABCDEF" for c in value)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate a params file; every problem names its dotted key and the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found (run from the repository root)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_params(raw if raw is not None else {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_params(raw: Any) -> Params:
    """Build :class:`Params` from a plain mapping (what YAML gives)."""
    return _build(Params, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {_dotted(prefix, close[0])!r}?)" if close else ""
        raise ConfigError(
            f"unknown key {_dotted(prefix, key)!r}{hint}; known keys here: {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        dotted = _dotted(prefix, name)
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {dotted!r}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, dotted)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{dotted}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise ConfigError(f"{dotted}: expected one of {list(allowed)}, got {value!r}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping, got {_kind(value)}")
        return {
            _coerce(key_tp, k, dotted): _coerce(value_tp, v, f"{dotted}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {_kind(value)}")
        return tuple(_coerce(item_tp, v, f"{dotted}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    else:  # pragma: no cover - a new field type needs a rule above
        raise TypeError(f"no rule to read {dotted} as {tp!r}")
    raise ConfigError(f"{dotted}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if tp is Path:
        return "a path"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
