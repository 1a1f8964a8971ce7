"""params.yaml, read once into frozen, typed dataclasses.

Every key is checked at load time: an unknown key, a missing required key or a value
of the wrong type raises :class:`ConfigError` naming the dotted key (``split.ratios.val``),
with a suggestion when the key looks like a typo. Every key must be there: params.yaml is
the one place defaults are written, and these classes only declare types and checks. Each
stage then receives only the sections it reads; dvc.yaml lists the exact keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


@dataclass(frozen=True)
class Paths:
    """Every file and folder the stages share; dvc.yaml templates them as ``${paths.x}``."""

    downloads: Path
    raw: Path
    label_rows: Path
    manifest: Path
    splits: Path
    metrics: Path
    quarantine: Path
    validation_docs: Path
    features: Path
    feature_cache: Path
    head: Path
    model: Path
    checkpoints: Path
    calibration: Path
    accepted_classes: Path
    head_curves: Path
    finetune_curves: Path
    confusion: Path
    evaluation: Path
    onnx: Path
    onnx_int8: Path
    labels: Path
    model_card: Path
    report: Path
    run_log: Path

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

    def per_class_table(self, model: str) -> Path:
        """evaluate's per-class accuracy table of ``model`` (head or finetuned)."""
        return self.evaluation / f"per_class_{model}.csv"

    def most_confused_table(self, model: str) -> Path:
        return self.evaluation / f"most_confused_{model}.csv"

    def confusion_image(self, model: str) -> Path:
        return self.evaluation / f"confusion_{model}.png"

    def predictions_table(self) -> Path:
        """The fine-tuned model's prediction and confidence for every test image."""
        return self.evaluation / "predictions_finetuned.csv"

    def run_log_file(self, stage: str) -> Path:
        """``logs/stages/<stage>.json``: when the stage last ran and how long it took."""
        return self.run_log / f"{stage}.json"


@dataclass(frozen=True)
class LabelColumns:
    """The columns of a ``data.labels`` table that hold each file's path and its label."""

    path: str
    label: str

    def __post_init__(self) -> None:
        if not (self.path and self.label):
            raise ConfigError("data.label_columns.path and .label must be column names")
        if self.path == self.label:
            raise ConfigError(
                f"data.label_columns: path and label are both {self.path!r}; name two columns"
            )


@dataclass(frozen=True)
class DataParams:
    """Where the labelled images come from, and where their labels do: class folders, or a
    table (``labels``) beside the images."""

    source: str
    sha256: str | None
    md5: str | None  # for publishers that give only an MD5 (Caltech's data repository)
    member: str | None
    exclude_classes: tuple[str, ...]
    labels: str | None
    labels_sha256: str | None
    label_columns: LabelColumns

    def __post_init__(self) -> None:
        for key, value, digits in (
            ("sha256", self.sha256, 64),
            ("md5", self.md5, 32),
            ("labels_sha256", self.labels_sha256, 64),
        ):
            if value is not None and not _is_hex(value, digits):
                raise ConfigError(f"data.{key} must be {digits} hex digits, got {value!r}")
        if self.labels is not None and not self.labels.strip():
            raise ConfigError("data.labels must name a table (CSV, TSV or Parquet) or be null")
        if self.labels_sha256 is not None and self.labels is None:
            raise ConfigError("data.labels_sha256 is set but data.labels is null")


@dataclass(frozen=True)
class DownloadParams:
    """How hard to try when fetching, and how much an archive may unpack to."""

    retries: int
    timeout_s: float
    max_extracted_bytes: int
    max_files: int


@dataclass(frozen=True)
class ValidateParams:
    """Bounds that the Great Expectations suite enforces on the manifest, and whether the
    set of classes may differ from the one the previous successful run accepted."""

    min_images_per_class: int
    min_side: int
    max_side: int
    max_pixels: int
    allow_class_change: bool


@dataclass(frozen=True)
class SplitRatios:
    train: float
    val: float
    test: float

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

    ratios: SplitRatios
    train_per_class: int | None
    seed: int
    drop_small_classes: bool

    def __post_init__(self) -> None:
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ConfigError("split.train_per_class must be a positive integer or null")


TIMM, TORCHVISION = "timm:", "torchvision:"  # model.backbone prefixes: any model by name
WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class ModelParams:
    """Which pretrained backbone to start from (see ``backbones.BACKBONES``), or any timm
    or torchvision model by name (``timm:<name>``, ``torchvision:<builder>``).

    ``weights``: ``imagenet`` (the model's pretrained weights) or ``none`` (random) for
    every backbone; a weights file for ``timm:``; a weights enum name (``IMAGENET1K_V2``)
    for ``torchvision:``.
    """

    backbone: str
    weights: str
    resize: Literal["squash", "center_crop"]

    def __post_init__(self) -> None:
        weights, backbone = self.weights, self.backbone
        if weights in ("imagenet", "none"):
            return
        if backbone.startswith(TIMM) and weights.endswith(WEIGHT_FILES):
            return
        if (
            backbone.startswith(TORCHVISION)
            and weights.replace("_", "").isalnum()
            and weights.isupper()
        ):
            return
        if backbone.startswith(TIMM):
            expected = f"imagenet, none, or a weights file ({', '.join(WEIGHT_FILES)})"
        elif backbone.startswith(TORCHVISION):
            expected = "imagenet, none, or a weights enum name such as IMAGENET1K_V2"
        else:
            expected = "one of ['imagenet', 'none']"
        raise ConfigError(f"model.weights: expected {expected} for {backbone}, not {weights!r}")


Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation: RandomResizedCrop(scale_min..1), horizontal flip, colour jitter."""

    scale_min: float
    flip: bool
    jitter: float


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int
    precision: Precision
    engine: Literal["auto", "torch", "onnxruntime"]
    augmented_views: int
    augment: AugmentParams
    seed: int

    def __post_init__(self) -> None:
        if self.augmented_views < 0 or self.batch_size < 1:
            raise ConfigError("features.augmented_views must be >= 0 and features.batch_size >= 1")


@dataclass(frozen=True)
class HeadParams:
    """A head trained on cached features: ``mlp`` (the seed's) or ``linear``."""

    type: Literal["mlp", "linear"]
    hidden: int
    dropout: float
    lr: float | Literal["auto"]
    epochs: int
    batch_size: int
    weight_decay: float
    label_smoothing: float
    patience: int
    class_balanced: bool
    seed: int


@dataclass(frozen=True)
class FinetuneParams:
    """Backbone + trained head, last blocks (or all) unfrozen, discriminative learning rates.

    params.yaml's values come from Caltech-101 runs on the 2-core CPU, chosen on val
    (BENCHMARKS.md, Accuracy checks behind the defaults).
    """

    epochs: int
    unfreeze_blocks: int | Literal["all"]
    lr: float
    backbone_lr_mult: float
    warmup_fraction: float
    batch_size: int
    weight_decay: float
    label_smoothing: float
    class_balanced: bool
    patience: int
    precision: Precision
    augment: AugmentParams
    seed: int
    # A checkpoint inside an epoch every N batches (0: after each epoch only); a killed run
    # resumes at the last one exactly. Caltech on 2 CPU cores: 190 batches, ~5 min an epoch.
    checkpoint_every_steps: int
    # Clip the gradients' total norm to this (null: no clipping). A non-finite norm stops
    # the stage either way, before the optimiser step.
    max_grad_norm: float | None

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps < 0:
            raise ConfigError("finetune.checkpoint_every_steps must be >= 0 (0: per epoch only)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError("finetune.max_grad_norm must be > 0, or null for no clipping")


@dataclass(frozen=True)
class EvaluateParams:
    ece_bins: int
    batch_size: int
    precision: Precision


@dataclass(frozen=True)
class ExportParams:
    """ONNX export; ``quantize`` adds a static int8 model calibrated on training images."""

    opset: int
    quantize: bool
    calibration_images: int
    calibration_method: Literal["minmax", "percentile", "entropy"]

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
    one-sided at ``significance`` on the test split (pipeline/reporting/significance.py)."""

    threads: int
    batch_size: int
    latency_runs: int
    throughput_batches: int
    max_abs_diff: float
    min_top1_agreement: float
    max_top1_gap: float
    max_int8_drop: float
    significance: float

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

    thumbnails_per_class: int  # training images shown per class
    thumbnail_px: int  # longest side of a thumbnail
    confused_pairs: int  # most-confused class pairs shown with examples
    examples_per_pair: int  # misclassified test images shown per pair
    max_listed_files: int  # quarantined files / leaks listed; the rest are counted

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

    cron: str
    timezone: str
    timeouts_s: dict[str, float]
    download_retries: int
    retry_delay_s: float
    lock_timeout_s: float
    push: bool
    heartbeat_s: int
    pools: dict[str, str]  # work pool per placement (dvc.yaml meta.placement), distributed runs

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
        if not self.pools or not all(isinstance(v, str) and v for v in self.pools.values()):
            raise ConfigError(
                "flows.pools maps each placement to a work pool name, e.g. "
                "{gpu: gpu-pool, cpu: cpu-pool}"
            )
        if self.heartbeat_s < 30:
            raise ConfigError(
                f"flows.heartbeat_s must be at least 30 (Prefect's minimum), got {self.heartbeat_s}"
            )

    def timeout_for(self, stage: str) -> float:
        return self.timeouts_s.get(stage, self.timeouts_s["default"])


@dataclass(frozen=True)
class Params:
    paths: Paths
    data: DataParams
    download: DownloadParams
    validate: ValidateParams
    split: SplitParams
    model: ModelParams
    features: FeaturesParams
    head: HeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    export: ExportParams
    onnx_check: OnnxCheckParams
    report: ReportParams
    flows: FlowsParams
    device: Literal["auto", "cpu", "cuda"]


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


def overlay(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, mapping by mapping (a new dict): what a
    caller changes on top of params.yaml (benchmarks, tests)."""
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = overlay(result[key], value)
        else:
            result[key] = value
    return result


def apply_overrides(text: str, overrides: dict[str, Any]) -> str:
    """params.yaml's ``text`` with ``overrides`` (dotted keys: ``{"head.lr": 0.0005}``) set,
    checked by the same loader as the file: an unknown key or a wrong type raises
    ConfigError naming the dotted key, before anything runs. Comments and layout survive
    (a ruamel round trip), so the text can stand in for params.yaml during a run.
    """
    from io import StringIO

    from ruamel.yaml import YAML  # imported here: only the flows override params

    round_trip = YAML()
    data = round_trip.load(text)
    for dotted, value in overrides.items():
        node = data
        *sections, leaf = dotted.split(".")
        for part in sections:
            # A missing or non-mapping section becomes one, for the loader to name.
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    buffer = StringIO()
    round_trip.dump(data, buffer)
    try:
        parse_params(yaml.safe_load(buffer.getvalue()))
    except ConfigError as exc:
        raise ConfigError(f"overrides {', '.join(overrides)}: {exc}") from None
    return buffer.getvalue()


def parse_params(raw: Any) -> Params:
    """Build :class:`Params` from a plain mapping (what YAML gives)."""
    return _build(Params, raw, "")


def parse_section(raw: Any, name: str) -> Any:
    """The section ``name`` (``flows``) of a params mapping, checked like the whole file,
    the other sections left unread: for code that may be older than the params it is
    given (a pool's worker before it checks out a run's commit), which a key added to
    another section must not stop."""
    hints = typing.get_type_hints(Params)
    if name not in hints:
        raise ConfigError(f"no section {name!r} in params; sections: {', '.join(hints)}")
    if not isinstance(raw, dict) or name not in raw:
        raise ConfigError(f"missing key {name!r}")
    return _coerce(hints[name], raw[name], name)


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
