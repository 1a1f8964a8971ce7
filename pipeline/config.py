"""params.yaml, read once into frozen, typed dataclasses.

Every key is checked at load time: an unknown key, a missing required key, a value of
the wrong type or outside what the key accepts raises :class:`ConfigError` naming the
dotted key (``split.ratios.val``), with a suggestion when the key looks like a typo. What
a key accepts is declared once, on its type (``Annotated[float, Gt(0)]``: a number > 0;
rules across keys in ``__post_init__``), and read by the loader, the settings reference
(docs/settings.md) and the fuzz test. Every key must be there: params.yaml is the one place
defaults are written, and these classes only declare types and checks. Each stage then
receives only the sections it reads; dvc.yaml lists the exact keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from annotated_types import BaseMetadata, Ge, GroupedMetadata, Gt, Interval, Le, Lt, MinLen

from pipeline.errors import ConfigError

PARAMS_FILE = Path("params.yaml")
# Keys that were renamed: an older params.yaml fails with the new name, not a guess.
RENAMED = {"paths.feature_cache": "paths.memo"}

# What a value may be beside its type: each key's type says it once.
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, lt=1)]  # dropout, smoothing, warmup: 1 is all
Rate = Annotated[float, Interval(ge=0, le=1)]  # agreement and gaps between accuracies
AtLeastOne = Annotated[int, Ge(1)]
Count = Annotated[int, Ge(0)]
Seed = Annotated[int, Interval(ge=0, lt=2**32)]  # numpy's seeds are 32-bit
Text = Annotated[str, MinLen(1)]


@dataclass(frozen=True)
class Paths:
    """Every file and folder the stages share; dvc.yaml templates them as ``${paths.x}``."""

    downloads: Path
    source_fingerprint: Path
    raw: Path
    label_rows: Path
    manifest: Path
    splits: Path
    metrics: Path
    quarantine: Path
    validation_docs: Path
    features: Path
    memo: Path
    head: Path
    model: Path
    checkpoints: Path
    calibration: Path
    accepted_classes: Path
    data_issues: Path
    champion_images: Path
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
    production: Path

    def under(self, root: Path) -> Paths:
        """These paths inside the workspace ``root`` (they are relative to it in params.yaml)."""
        return dataclasses.replace(
            self, **{f.name: Path(root) / getattr(self, f.name) for f in dataclasses.fields(self)}
        )

    def metrics_file(self, stage: str) -> Path:
        """``metrics/<stage>.json``: one name everywhere."""
        return self.metrics / f"{stage}.json"

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

    source: Text
    sha256: str | None
    md5: str | None  # for publishers that give only an MD5 (Caltech's data repository)
    member: str | None
    exclude_classes: tuple[str, ...]
    labels: str | None
    labels_sha256: str | None
    label_columns: LabelColumns
    # true: a remote file (an http(s) URL, an s3:// archive object or table) is taken as it
    # is now, and what was taken is recorded; false: it must match its pinned sha256.
    follow: bool

    def __post_init__(self) -> None:
        if self.follow and (self.sha256 or self.md5 or self.labels_sha256):
            pinned = [k for k in ("sha256", "md5", "labels_sha256") if getattr(self, k)]
            raise ConfigError(
                f"data.follow is true, so data.{pinned[0]} must be null: a followed source "
                "takes whatever its URL holds now; pin a digest or follow, not both"
            )
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

    retries: Count  # further attempts after a failure
    timeout_s: Positive
    max_extracted_bytes: AtLeastOne
    max_files: AtLeastOne


@dataclass(frozen=True)
class ValidateParams:
    """Bounds that the Great Expectations suite enforces on the manifest, and whether the
    set of classes may differ from the one the previous successful run accepted."""

    min_images_per_class: AtLeastOne
    min_side: AtLeastOne
    max_side: AtLeastOne
    max_pixels: AtLeastOne
    allow_class_change: bool

    def __post_init__(self) -> None:
        if self.max_side < self.min_side:
            raise ConfigError(
                f"validate.max_side: expected >= validate.min_side ({self.min_side}), "
                f"got {self.max_side}"
            )
        if self.max_pixels < self.min_side**2:
            raise ConfigError(
                f"validate.max_pixels: expected >= validate.min_side squared "
                f"({self.min_side**2}), got {self.max_pixels}"
            )


@dataclass(frozen=True)
class SplitRatios:
    train: Annotated[float, Interval(gt=0, lt=1)]
    val: Annotated[float, Interval(gt=0, lt=1)]
    test: Annotated[float, Interval(gt=0, lt=1)]

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(f"split.ratios must sum to 1 (train + val + test), got {total:g}")


@dataclass(frozen=True)
class SplitParams:
    """Stratified, stable train/val/test split."""

    ratios: SplitRatios
    train_per_class: AtLeastOne | None
    seed: Seed
    drop_small_classes: bool

    @property
    def min_class_size(self) -> int:
        """The fewest images a class needs for one or more in each split (and
        ``train_per_class`` in train)."""
        return 3 if self.train_per_class is None else self.train_per_class + 2


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

    backbone: Text
    weights: Text
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

    scale_min: Annotated[float, Interval(gt=0, le=1)]  # of the image's area
    flip: bool
    jitter: Annotated[float, Interval(ge=0, le=0.5)]  # brightness, contrast, saturation: ±


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: AtLeastOne
    precision: Precision
    engine: Literal["auto", "torch", "onnxruntime"]
    augmented_views: Count
    augment: AugmentParams
    seed: Seed


@dataclass(frozen=True)
class DataIssuesParams:
    """Advice on the data from the cached embeddings (docs/data-issues.md)."""

    folds: Annotated[
        int, Interval(ge=2, le=20)
    ]  # each image scored by a probe trained on the others
    seed: Seed
    neighbours: AtLeastOne  # outliers: mean cosine distance to this many nearest images
    outlier_fence: Positive  # flagged beyond Q3 + fence x IQR of that distance
    near_duplicate_similarity: Annotated[float, Interval(gt=0, le=1)]  # cosine, different labels
    confused_pairs: Count  # class pairs listed


@dataclass(frozen=True)
class HeadParams:
    """A head trained on cached features: ``mlp`` (the seed's) or ``linear``."""

    type: Literal["mlp", "linear"]
    hidden: Annotated[int, Interval(ge=1, le=65536)]  # mlp only
    dropout: Fraction
    lr: Positive | Literal["auto"]
    epochs: AtLeastOne
    batch_size: AtLeastOne
    weight_decay: NonNegative
    label_smoothing: Fraction
    patience: AtLeastOne
    class_balanced: bool
    seed: Seed


@dataclass(frozen=True)
class FinetuneParams:
    """Backbone + trained head, last blocks (or all) unfrozen, discriminative learning rates.

    params.yaml's values come from Caltech-101 runs on the 2-core CPU, chosen on val
    (BENCHMARKS.md, model quality: why the defaults).
    """

    epochs: Count  # 0: skip
    unfreeze_blocks: AtLeastOne | Literal["all"]
    lr: Positive
    backbone_lr_mult: Positive
    warmup_fraction: Fraction
    batch_size: AtLeastOne
    weight_decay: NonNegative
    label_smoothing: Fraction
    class_balanced: bool
    patience: AtLeastOne
    precision: Precision
    augment: AugmentParams
    seed: Seed
    # A checkpoint inside an epoch every N batches (0: after each epoch only); a killed run
    # resumes at the last one exactly. Caltech on 2 CPU cores: 190 batches, ~5 min an epoch.
    checkpoint_every_steps: Count
    # Clip the gradients' total norm to this (null: no clipping). A non-finite norm stops
    # the stage either way, before the optimiser step.
    max_grad_norm: Positive | None


@dataclass(frozen=True)
class EvaluateParams:
    ece_bins: AtLeastOne
    batch_size: AtLeastOne
    precision: Precision


@dataclass(frozen=True)
class ExportParams:
    """ONNX export; ``quantize`` adds a static int8 model calibrated on training images."""

    # 17 or later: onnxruntime's well-supported range; up to what torch's exporter writes
    opset: Annotated[int, Interval(ge=17, le=23)]
    quantize: bool
    calibration_images: AtLeastOne
    calibration_method: Literal["minmax", "percentile", "entropy"]


@dataclass(frozen=True)
class OnnxCheckParams:
    """Parity bounds between the ONNX and the PyTorch model, and how CPU speed is measured.

    The bounds on predictions (agreement, top-1 gap, int8 drop) are on true rates, tested
    one-sided at ``significance`` on the test split (pipeline/reporting/significance.py)."""

    threads: Annotated[int, Interval(ge=1, le=1024)]
    batch_size: AtLeastOne
    latency_runs: AtLeastOne
    throughput_batches: AtLeastOne
    max_abs_diff: Positive
    min_top1_agreement: Rate
    max_top1_gap: Rate
    max_int8_drop: Rate
    significance: Annotated[float, Interval(gt=0, lt=1)]


@dataclass(frozen=True)
class PromoteParams:
    """Champion and challenger (pipeline/stages/promote.py, docs/registry.md): where the
    model registry lives, and the rule that moves its ``production`` alias.

    The challenger is promoted unless the test images the champion never saw are evidence,
    at ``alpha``, that it is worse (a paired one-sided exact test on the images only one of
    them gets right); with ``min_gain`` set, it must also beat the champion's top-1 by that
    much on those images."""

    # A local folder, file://, or s3://bucket/prefix (endpoint and credentials from the
    # standard AWS environment variables).
    registry: Text
    name: Annotated[str, MinLen(1)]  # the registered model's name: <registry>/<name>/...
    alpha: Annotated[float, Interval(gt=0, lt=1)]
    min_gain: Annotated[float, Interval(ge=-1, le=1)] | None
    # How long a promoter waits for another one's lock, and how long a lock held by a
    # process that died blocks the registry (S3; a local lock dies with its process).
    lock_timeout_s: Positive
    lock_lease_s: Annotated[float, Ge(5)]

    def __post_init__(self) -> None:
        if "/" in self.name or self.name in (".", "..") or self.name.strip() != self.name:
            raise ConfigError(
                f"promote.name: expected a name without '/' or surrounding spaces, got "
                f"{self.name!r}"
            )


@dataclass(frozen=True)
class ReportParams:
    """How much of the data the run report (``paths.report``) shows as pictures."""

    thumbnails_per_class: Count  # training images shown per class
    thumbnail_px: Annotated[int, Interval(ge=1, le=4096)]  # longest side of a thumbnail
    confused_pairs: Count  # most-confused class pairs shown with examples
    examples_per_pair: Count  # misclassified test images shown per pair
    max_listed_files: AtLeastOne  # quarantined files / leaks listed; the rest are counted
    data_issues_shown: Count  # likeliest data issues of each kind shown as thumbnails


@dataclass(frozen=True)
class FlowsParams:
    """How the Prefect flow runs the DVC stages (read by ``flows/``, by no DVC stage)."""

    cron: Text
    timezone: Text
    timeouts_s: dict[str, Positive]
    download_retries: Count
    retry_delay_s: NonNegative
    lock_timeout_s: NonNegative
    push: bool
    heartbeat_s: Annotated[int, Ge(30)]  # Prefect's minimum
    pools: dict[str, Text]  # work pool per placement (dvc.yaml meta.placement), distributed runs
    # the source sensor's period: fingerprint data.source, start a run when it changed
    sensor_interval_s: Annotated[int, Ge(10)]

    @property
    def zombie_after_s(self) -> int:
        """A run with no heartbeat for this long is marked Crashed (three missed beats)."""
        return 3 * self.heartbeat_s

    def __post_init__(self) -> None:
        if "default" not in self.timeouts_s:
            raise ConfigError("flows.timeouts_s needs a 'default' entry (seconds per stage)")
        if len(self.cron.split()) != 5:
            raise ConfigError(f"flows.cron must have five fields, got {self.cron!r}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise ConfigError(
                f"flows.timezone: expected an IANA time zone such as UTC or Europe/Paris, "
                f"got {self.timezone!r}"
            ) from None
        if not self.pools:
            raise ConfigError(
                "flows.pools maps each placement to a work pool name, e.g. "
                "{gpu: gpu-pool, cpu: cpu-pool}"
            )

    def timeout_for(self, stage: str) -> float:
        return self.timeouts_s.get(stage, self.timeouts_s["default"])


@dataclass(frozen=True)
class Params:
    """Rules across keys, checked at load time too: `validate.max_side` >= `validate.min_side`
    and `validate.max_pixels` >= its square; `split.ratios` sum to 1; unless
    `split.drop_small_classes`, `validate.min_images_per_class` is at least what `split`
    shares out (3, or `split.train_per_class` + 2); `data.labels_sha256` needs `data.labels`;
    `data.label_columns` names two columns; `data.follow` needs no pinned digest; `model.weights` fits `model.backbone`;
    `flows.timeouts_s` has a `default`."""

    paths: Paths
    data: DataParams
    download: DownloadParams
    validate: ValidateParams
    split: SplitParams
    model: ModelParams
    features: FeaturesParams
    data_issues: DataIssuesParams
    head: HeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    export: ExportParams
    onnx_check: OnnxCheckParams
    promote: PromoteParams
    report: ReportParams
    flows: FlowsParams
    device: Literal["auto", "cpu", "cuda"]

    def __post_init__(self) -> None:
        # Rules across sections: a value that passes its own check but that another key
        # makes fail later, after hours of work.
        need, have = self.split.min_class_size, self.validate.min_images_per_class
        if not self.split.drop_small_classes and have < need:
            raise ConfigError(
                f"validate.min_images_per_class: expected >= {need}, the fewest images split "
                f"can share out (split.train_per_class: {self.split.train_per_class}), "
                f"got {have}; or set split.drop_small_classes: true"
            )


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
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    for key in unknown:
        if (dotted := _dotted(prefix, str(key))) in RENAMED:
            raise ConfigError(f"{dotted!r} was renamed to {RENAMED[dotted]!r}: rename it")
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
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        result = _coerce(base, value, dotted)
        if not all(_holds(rule, result) for rule in flat_rules(rules)):
            raise ConfigError(f"{dotted}: expected {accepts(tp)}, got {value!r}")
        return result
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, dotted)
            except ConfigError:
                continue  # the next option may take it; none did: the error below
        raise ConfigError(f"{dotted}: expected {accepts(tp)}, got {value!r}")
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
            if abs(value) < 2**63:  # what torch and numpy hold
                return value
            raise ConfigError(f"{dotted}: expected an int of at most 63 bits, got {value!r}")
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f"{dotted}: expected a finite float, got {value!r}")
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    else:  # pragma: no cover - a new field type needs a rule above
        raise TypeError(f"no rule to read {dotted} as {tp!r}")
    raise ConfigError(f"{dotted}: expected {accepts(tp)}, got {_kind(value)} {value!r}")


def flat_rules(rules: list[Any]) -> list[BaseMetadata]:
    """Annotated's rules, a grouped one (``Interval``) as its parts (``Ge``, ``Lt``): what
    the loader checks, and what the fuzz test draws accepted values from."""
    flat = []
    for rule in rules:
        flat.extend(rule if isinstance(rule, GroupedMetadata) else [rule])
    return flat


def _holds(rule: BaseMetadata, value: Any) -> bool:
    if isinstance(rule, Gt):
        return value > rule.gt
    if isinstance(rule, Ge):
        return value >= rule.ge
    if isinstance(rule, Lt):
        return value < rule.lt
    if isinstance(rule, Le):
        return value <= rule.le
    if isinstance(rule, MinLen):
        return len(value) >= rule.min_length
    raise TypeError(f"no check for {rule!r}")  # pragma: no cover - a new kind needs one


def _rule_text(rule: BaseMetadata) -> str:
    for kind, sign, attr in ((Gt, ">", "gt"), (Ge, ">=", "ge"), (Lt, "<", "lt"), (Le, "<=", "le")):
        if isinstance(rule, kind):
            bound = getattr(rule, attr)
            return f"{sign} {bound if isinstance(bound, int) else f'{bound:g}'}"
    if isinstance(rule, MinLen) and rule.min_length == 1:
        return "non-empty"
    raise TypeError(f"no text for {rule!r}")  # pragma: no cover


def declared_type(dotted: str) -> Any:
    """The type :class:`Params` declares for the key ``dotted`` (for an entry of a mapping
    such as ``flows.timeouts_s.default``, the mapping's value type), rules included."""
    tp: Any = Params
    for part in dotted.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp, include_extras=True)
            if part not in hints:
                raise KeyError(dotted)
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise KeyError(dotted)
    return tp


def accepts(tp: Any) -> str:
    """What a key accepts, in the words its errors and the settings reference use:
    ``float > 0 or 'auto'``, ``int >= 0 and < 4294967296``."""
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Annotated:
        base, *rules = typing.get_args(tp)
        texts = [_rule_text(rule) for rule in flat_rules(rules)]
        if texts == ["non-empty"]:
            return f"non-empty {accepts(base)}"
        return f"{accepts(base)} {' and '.join(texts)}"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(accepts(t) for t in typing.get_args(tp))
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
