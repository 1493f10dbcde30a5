"""The artifact cache: tensors stored under a hash of exactly the config that determines them.

Entries are directories ``<root>/<kind>/<hash>/`` holding ``tensors.safetensors``, the
``spec.json`` they were built from and a ``manifest.json`` with the entry format and the
SHA-256 digest of the tensors file. A build happens under a file lock, is written to a
temporary directory and renamed into place, so a reader never sees a partial entry and
concurrent jobs asking for the same artifact build it once.

An entry is used only when its manifest has the current entry format, the tensors file
matches its digest, and the caller's ``validate`` accepts the tensors. Anything else (an
entry written by an older bdlab, a truncated or altered file, a model without the attack
state the run needs) is reported in one warning line and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

# part of every key: changing it re-keys every artifact
CACHE_FORMAT = 1
# what an entry on disk looks like; entries of another format are rebuilt (2: manifest + digest)
ENTRY_FORMAT = 2
TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"

Tensors = dict[str, Tensor]


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable hash of a JSON-able spec (key order does not matter)."""
    text = json.dumps({"format": CACHE_FORMAT, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def content_digest(*parts: Any) -> str:
    """One SHA-256 over the content of tensors (their bytes, shape and dtype), image sets (images and
    labels) and JSON-able values, in order: the one way an artifact's key names the data it came from."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            array = part.detach().cpu().contiguous()
            digest.update(f"{tuple(array.shape)}{array.dtype}".encode())
            digest.update(array.numpy().tobytes())
        elif hasattr(part, "images") and hasattr(part, "labels"):
            digest.update(content_digest(part.images, part.labels).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactCache:
    """Build-once storage of tensor dictionaries (model state dicts, poisoned datasets)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, kind: str, spec: dict[str, Any]) -> Path:
        return self.root / kind / spec_hash(spec)

    def read(self, entry: Path, validate: Callable[[Tensors], bool] | None = None) -> Tensors | None:
        """The entry's tensors, or None when it is absent or unusable (with one warning line saying why)."""
        tensors_file = entry / TENSORS
        if not tensors_file.is_file():
            return None
        problem = None
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != ENTRY_FORMAT:
            problem = "was written by an older bdlab (no current manifest)"
        elif file_digest(tensors_file) != manifest.get("sha256"):
            problem = "is corrupt (its tensors do not match the digest in its manifest)"
        else:
            try:
                tensors = load_file(str(tensors_file))
            except Exception as error:  # a digest collision is not a worry; a library change could be
                problem = f"cannot be read ({type(error).__name__})"
            else:
                if validate is None or validate(tensors):
                    return tensors
                problem = "lacks what this run needs from it (e.g. learned attack state)"
        log.warning("cache entry %s %s; rebuilding it", entry, problem)
        return None

    def get_or_build(self, kind: str, spec: dict[str, Any], build: Callable[[], Tensors],
                     validate: Callable[[Tensors], bool] | None = None) -> tuple[Tensors, bool]:
        """Return ``(tensors, reused)``: the cached entry, or ``build()``'s result after storing it.

        ``validate`` (optional) says whether a readable entry holds everything the caller needs.
        In a multi-process (DDP) run only rank 0 locks and stores: the other ranks build alongside
        it (their ``build()`` joins the same distributed training) and keep nothing, since rank 0
        holds the lock for the whole build and a rank waiting on it would deadlock the group.
        """
        entry = self.path(kind, spec)
        if rank_zero_only.rank != 0:
            tensors = self.read(entry, validate)
            return (tensors, True) if tensors is not None else (build(), False)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            tensors = self.read(entry, validate)
            if tensors is not None:
                log.info("reusing cached %s %s", kind, entry)
                return tensors, True
            tensors = build()
            self._store(entry, spec, tensors)
            log.info("stored %s %s", kind, entry)
            return tensors, False

    def _store(self, entry: Path, spec: dict[str, Any], tensors: Tensors) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / TENSORS))
            (staging / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
            manifest = {"format": ENTRY_FORMAT, "sha256": file_digest(staging / TENSORS), "keys": sorted(tensors)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if entry.exists():  # an unusable entry being replaced (we hold its lock)
                shutil.rmtree(entry)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
