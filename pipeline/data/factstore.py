"""Image facts on disk by sha256: what validate decoded once, kept for every later run.

``FactCache`` keeps each file's ``images.ImageFacts`` (format, mode, size, EXIF
orientation, whether it decoded or why not, its perceptual hash) by the file's sha256 in
the memo (append-only shards, as ``featurestore.FeatureCache`` keeps embeddings), so a
rerun after new images arrive decodes only those. The bounds in params.yaml are applied
afterwards (``images.judge``), so changing them judges kept facts again. The key holds
the code that makes and stores the facts and the decoders' versions: an edit there, or
another Pillow, decodes everything again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from pipeline.data import images
from pipeline.data.images import ImageFacts
from pipeline.system import memo

FIELDS = [f.name for f in fields(ImageFacts)]
# Pillow's image-format plugins outside its codecs; their library versions decide decoding too.
DECODER_MODULES = ("webp", "avif")


def facts_key() -> str:
    """The memo key of every kept fact: this code, ``images.py``, and Pillow's decoders."""
    import PIL
    from PIL import features

    code = "".join(inspect.getsource(m) for m in (images, sys.modules[__name__]))
    decoders = {c: features.version_codec(c) for c in features.get_supported_codecs()}
    decoders.update(
        {m: features.version_module(m) for m in DECODER_MODULES if features.check_module(m)}
    )
    spec = {
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "pillow": PIL.__version__,
        "decoders": decoders,
    }
    return memo.digest(spec)


class FactCache:
    """Image facts by sha256 under one key (``facts_key``), as shards of the memo's
    ``image_facts`` kind."""

    def __init__(self, root: Path, key: str | None = None) -> None:
        self.store, self.key = memo.Store(root, memo.IMAGE_FACTS), key or facts_key()

    @property
    def folder(self) -> Path:
        return self.store.path(self.key)

    def load(self) -> dict[str, ImageFacts]:
        """The kept facts by sha256 (a damaged shard is warned about and dropped)."""
        found: dict[str, ImageFacts] = {}
        for shas, facts in self.store.shards(self.key, read_shard):
            found.update(zip(shas, facts, strict=True))
        return found

    def add(self, facts: dict[str, ImageFacts]) -> None:
        """Keep ``facts`` (by sha256) as one new shard."""
        if not facts:
            return
        shas = sorted(facts)

        def write(tmp: Path) -> None:
            records = [json.dumps(asdict(facts[sha]), sort_keys=True) for sha in shas]
            with open(tmp, "wb") as fh:
                np.savez(fh, sha256=np.asarray(shas), facts=np.asarray(records))

        self.store.add_shard(self.key, shas, write)


def read_shard(shard: Path) -> tuple[list[str], list[ImageFacts]]:
    """A shard's sha256s and facts; numpy refuses pickled objects (allow_pickle=False), and
    a record without exactly the fields of ``ImageFacts`` makes the shard unusable."""
    with np.load(shard) as data:
        shas, records = data["sha256"].tolist(), data["facts"].tolist()
    if len(shas) != len(records):
        raise ValueError(f"{len(shas)} sha256s for {len(records)} facts")
    facts = []
    for record in records:
        values = json.loads(record)
        if not isinstance(values, dict) or sorted(values) != sorted(FIELDS):
            raise ValueError(f"a record without the fields {FIELDS}: {record[:80]!r}")
        facts.append(ImageFacts(**values))
    return shas, facts
