"""A service's model that follows the registry's ``production`` alias, without a restart
and without dropping a request.

``FollowedModel`` polls the alias every ``poll_s`` seconds. A new version is downloaded,
its sha256 checked, its session built and run once (warm), and only then does one
attribute change to point at it: a request takes ``followed.current`` once and uses that
:class:`Served` for all its work, so every answer comes from one whole model, and a
request in flight during a swap finishes on the model it started with. A failed poll
(registry down, a bad file) keeps the current model and logs why.

Imports only the standard library, numpy, onnxruntime and Pillow (through predict and the
registry), like the rest of ``pipeline.serving``.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.registry.store import ModelRef, parse_ref, resolve
from pipeline.serving.predict import OnnxClassifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One whole model: its version, its file's sha256 and its session."""

    version: int
    sha256: str
    model: OnnxClassifier


def warmed(path: Path, threads: int) -> OnnxClassifier:
    """A session of ``path`` that has run once (first runs allocate and pick kernels)."""
    model = OnnxClassifier(path, threads)
    size = model.contract.preprocessing.input_size
    model.logits(np.zeros((1, 3, size, size), dtype=np.float32))
    return model


class FollowedModel:
    """The current version of a registry alias, swapped whole when it moves.

    ``source``: ``URL#NAME`` or ``URL#NAME@ALIAS`` (a folder, file:// or s3://)."""

    def __init__(
        self,
        source: str | ModelRef,
        poll_s: float = 30.0,
        threads: int = 0,
        cache: Path | None = None,
    ) -> None:
        self.ref = parse_ref(source) if isinstance(source, str) else source
        self.poll_s, self.threads, self.cache = poll_s, threads, cache
        self.current = self._load()  # the one reference requests read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self) -> Served:
        resolved = resolve(self.ref, self.cache)
        return Served(resolved.version, resolved.sha256, warmed(resolved.path, self.threads))

    def refresh(self) -> bool:
        """Poll the alias once; swap in its version if it moved. True when it swapped."""
        try:
            target = self.ref.registry().alias(self.ref.alias)
            if target is None or target.sha256 == self.current.sha256:
                return False
            served = self._load()
        except (PipelineError, OSError) as exc:  # the registry down, a bad file
            log.warning("%s: keeping version %d: %s", self.ref, self.current.version, exc)
            return False
        previous, self.current = self.current, served
        log.info("%s: now version %d (was %d)", self.ref, served.version, previous.version)
        return True

    def probabilities(self, batch: np.ndarray) -> tuple[int, np.ndarray]:
        """One model's calibrated probabilities on ``batch``, and which version gave them."""
        served = self.current
        return served.version, served.model.probabilities(batch)

    def start(self) -> FollowedModel:
        """Poll in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, daemon=True, name="followed-model")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def resolve_model(model: str, cache: str | None) -> Path:
    """The local, sha256-checked file a registry reference points at now."""
    try:
        if "#" in model:
            ref = parse_ref(model)
        else:  # the project's registry, from params.yaml (yaml imported only here)
            from pipeline.config import load_params
            from pipeline.errors import ConfigError

            try:
                cfg = load_params().promote
            except ConfigError as exc:
                raise DataError(
                    f"--model {model} names the project's registry (promote.registry), but "
                    f"{exc}; outside the project name it as URL#NAME"
                ) from None
            ref = ModelRef(cfg.registry, cfg.name, model.removeprefix("registry:"))
        resolved = resolve(ref, Path(cache) if cache else None)
    except PipelineError as exc:
        raise DataError(str(exc)) from None
    sys.stderr.write(
        f"predict: {ref}: version {resolved.version} (sha256 {resolved.sha256[:12]})\n"
    )
    return resolved.path
