"""The artifact cache: tensors stored under a hash of exactly the config that determines them.

Entries are directories ``<root>/<kind>/<hash>/`` holding ``tensors.safetensors`` and
``spec.json``. A build happens under a file lock, is written to a temporary directory and
renamed into place, so a reader never sees a partial entry and concurrent jobs asking for the
same artifact build it once.
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

CACHE_FORMAT = 1
TENSORS = "tensors.safetensors"


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable hash of a JSON-able spec (key order does not matter)."""
    text = json.dumps({"format": CACHE_FORMAT, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ArtifactCache:
    """Build-once storage of tensor dictionaries (model state dicts, poisoned datasets)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, kind: str, spec: dict[str, Any]) -> Path:
        return self.root / kind / spec_hash(spec)

    def get_or_build(self, kind: str, spec: dict[str, Any],
                     build: Callable[[], dict[str, Tensor]]) -> tuple[dict[str, Tensor], bool]:
        """Return ``(tensors, reused)``: the cached entry, or ``build()``'s result after storing it.

        In a multi-process (DDP) run only rank 0 locks and stores: the other ranks build alongside
        it (their ``build()`` joins the same distributed training) and keep nothing, since rank 0
        holds the lock for the whole build and a rank waiting on it would deadlock the group.
        """
        entry = self.path(kind, spec)
        if rank_zero_only.rank != 0:
            if (entry / TENSORS).is_file():
                return load_file(str(entry / TENSORS)), True
            return build(), False
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if (entry / TENSORS).is_file():
                log.info("reusing cached %s %s", kind, entry)
                return load_file(str(entry / TENSORS)), True
            tensors = build()
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
            try:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / TENSORS))
                (staging / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
                os.replace(staging, entry)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("stored %s %s", kind, entry)
            return tensors, False
