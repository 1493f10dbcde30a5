"""Export the poisoned training set an attacker would hand over:
``python -m bdlab.export out=poisoned.safetensors [attack=... dataset=...]``.

The file holds ``images`` (uint8 N,C,H,W), ``labels`` (int64, relabelled), ``is_poison``
(bool) and the attack config (and the class names, where the dataset has them) as metadata;
:func:`load_poisoned_set` reads it back, and ``dataset=tensors dataset.path=<file>`` trains on it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from bdlab.attacks.base import NoAttack, PoisonedSet
from bdlab.compose import compose_config
from bdlab.console import quiet_third_party
from bdlab.errors import ConfigError
from bdlab.pipeline import poisoned_training_set, prepare


def save_poisoned_set(poisoned: PoisonedSet, path: Path, metadata: dict[str, str]) -> None:
    """Atomic write of a poisoned set as safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({"images": poisoned.images, "labels": poisoned.labels, "is_poison": poisoned.is_poison}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_poisoned_set(path: str | Path) -> tuple[PoisonedSet, dict[str, str]]:
    """Read an exported poisoned set (safetensors: no code is ever unpickled)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    return PoisonedSet(tensors["images"], tensors["labels"], tensors["is_poison"]), metadata


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    args = list(sys.argv[1:] if argv is None else argv)
    outs = [a for a in args if a.startswith("out=")]
    if len(outs) != 1:
        print("bdlab: usage: python -m bdlab.export out=<file.safetensors> [hydra overrides]", file=sys.stderr)
        return 2
    out = Path(outs[0].split("=", 1)[1])
    try:
        cfg = compose_config(["logger=none", *[a for a in args if not a.startswith("out=")]])
        experiment = prepare(cfg)
        if isinstance(experiment.attack, NoAttack):
            raise ConfigError("attack", "attack=none has no poisoned set to export; pick an attack")
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        return 2
    poisoned = poisoned_training_set(experiment)
    metadata = {"dataset": experiment.data.name, "attack": experiment.attack.name,
                "attack_config": json.dumps(OmegaConf.to_container(cfg.attack, resolve=True))}
    if experiment.data.class_names is not None:
        metadata["class_names"] = json.dumps(list(experiment.data.class_names))
    save_poisoned_set(poisoned, out, metadata)
    print(f"wrote {out}: {len(poisoned)} images, {int(poisoned.is_poison.sum())} poisoned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
