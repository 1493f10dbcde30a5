"""The models a scan reads: a manifest (CSV), a directory, or a glob of weights files.

A manifest (``manifest.csv``, what ``python -m bdlab.zoo`` writes) has a header row and one row per model:

- required: ``name`` (unique), ``weights`` (a ``.safetensors`` file or a ``torch.save``'d state dict; a relative
  path is relative to the manifest's folder), ``model`` and ``dataset`` (``conf/model`` and ``conf/dataset``
  options);
- optional: ``overrides`` (further run overrides, space separated, for this model's run config), and the ground
  truth: ``trojaned`` (1 / 0 / empty: unknown), ``target_class`` (an integer, empty for clean or unknown),
  ``attack`` (the ``conf/attack`` option that trojaned it) and ``family`` (the label of the per-family tables;
  default the attack, or ``clean`` for a clean model);
- any other column is kept and copied to the scan's results.

A directory holding ``manifest.csv`` is read as that manifest; any other directory, and a glob, give one model
per weights file (``.safetensors``, ``.pt``, ``.pth``, ``.ckpt``, ``.bin``), named by its file name without the
suffix, with the scan's ``model`` / ``dataset`` options and no ground truth.
"""

from __future__ import annotations

import csv
import glob
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from bdlab.errors import ConfigError

MANIFEST = "manifest.csv"
REQUIRED = ("name", "weights", "model", "dataset")
GROUND_TRUTH = ("trojaned", "target_class", "attack", "family")
KNOWN = (*REQUIRED, "overrides", *GROUND_TRUTH)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


@dataclass(frozen=True)
class ModelEntry:
    """One model of a population: where its weights are, how to compose its run config, and what is known of it.

    ``index`` is its place in the population (the order of the results); ``overrides`` are run overrides
    (``dataset.size=8``); ``trojaned`` and ``target_class`` are None where unknown; ``extra`` holds a manifest's
    further columns, as written.
    """

    index: int
    name: str
    weights: Path
    model: str
    dataset: str
    overrides: tuple[str, ...] = ()
    trojaned: bool | None = None
    target_class: int | None = None
    attack: str = ""
    family: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def field(self) -> str:
        """How a bad-input line names this entry."""
        return f"models[{self.name}]"

    @property
    def group(self) -> tuple[str, str, tuple[str, ...]]:
        """Entries of one group share their run config but for the weights: one dataset load, one batch."""
        return self.model, self.dataset, self.overrides


def split_overrides(text: str, where: str) -> tuple[str, ...]:
    """Space-separated overrides (quotes group words), refused in one line when the quoting is broken."""
    try:
        return tuple(shlex.split(text or ""))
    except ValueError as error:
        raise ConfigError(where, f"cannot split {text!r} into overrides ({error}); separate them by spaces") from None


def _trojaned(value: str, where: str) -> bool | None:
    text = value.strip().lower()
    if not text:
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(where, f"got {value!r}; write 1 (trojaned), 0 (clean) or leave it empty (unknown)")


def _target(value: str, where: str) -> int | None:
    text = value.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(where, f"got {value!r}; write the target's class index (an integer) or leave it "
                          "empty") from None


def read_manifest(path: Path) -> list[ModelEntry]:
    """The entries of a manifest, checked row by row (a missing column, a repeated name, a missing weights file,
    a ground truth that is not 1/0/empty or contradicts itself: one ConfigError line naming the row)."""
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            header, rows = list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError("models", f"cannot read the manifest {path} ({error}); give a CSV file with a header row")
    missing = [column for column in REQUIRED if column not in header]
    if missing:
        raise ConfigError("models", f"the manifest {path} lacks the column(s) {', '.join(missing)}; a manifest needs "
                          f"{', '.join(REQUIRED)} (optional: overrides, trojaned, target_class, attack, family)")
    if not rows:
        raise ConfigError("models", f"the manifest {path} lists no model; add one row per model")
    entries: list[ModelEntry] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        name = (row.get("name") or "").strip()
        where = f"models[{name or f'row {index + 2}'}]"  # row 1 is the header
        for column in REQUIRED:
            if not (row.get(column) or "").strip():
                raise ConfigError(f"{where}.{column}", f"is empty (line {index + 2} of {path}); every row needs "
                                  f"{', '.join(REQUIRED)}")
        if name in seen:
            raise ConfigError(where, f"the name appears twice in {path}; give every model a name of its own")
        seen.add(name)
        weights = Path(row["weights"].strip()).expanduser()
        weights = weights if weights.is_absolute() else path.parent / weights
        if not weights.is_file():
            raise ConfigError(f"{where}.weights", f"no file at {weights}; give the path of a .safetensors file or a "
                              "torch.save'd state dict (relative paths are relative to the manifest's folder)")
        trojaned = _trojaned(row.get("trojaned") or "", f"{where}.trojaned")
        target = _target(row.get("target_class") or "", f"{where}.target_class")
        if target is not None and trojaned is False:
            raise ConfigError(f"{where}.target_class", f"got {target} for a clean model (trojaned=0); leave it empty "
                              "or mark the model trojaned")
        attack = (row.get("attack") or "").strip()
        family = (row.get("family") or "").strip() or attack or ("clean" if trojaned is False else "")
        entries.append(ModelEntry(
            index=index, name=name, weights=weights, model=row["model"].strip(), dataset=row["dataset"].strip(),
            overrides=split_overrides(row.get("overrides") or "", f"{where}.overrides"), trojaned=trojaned,
            target_class=target, attack=attack, family=family,
            extra={key: value or "" for key, value in row.items() if key not in KNOWN and key is not None}))
    return entries


def weights_files(spec: str) -> tuple[list[Path], str]:
    """The weights files of a directory or a glob, sorted, and how to name the source in a message."""
    if glob.has_magic(spec):
        found = [Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True)]
        return sorted(p for p in found if p.is_file()), f"the glob {spec!r}"
    folder = Path(spec).expanduser()
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES), f"the directory {folder}"


def entries_from_files(files: list[Path], source: str, model: str, dataset: str,
                       overrides: tuple[str, ...]) -> list[ModelEntry]:
    """One entry per weights file, named by its stem, without ground truth."""
    if not files:
        raise ConfigError("models", f"{source} holds no weights file ({', '.join(WEIGHT_SUFFIXES)}); give a "
                          "manifest, a directory of weights files or a glob that matches some")
    named: dict[str, Path] = {}
    for path in files:
        if path.stem in named:
            raise ConfigError("models", f"{named[path.stem].name} and {path.name} in {source} would both be named "
                              f"{path.stem!r}; keep one, or list them in a manifest with names of their own")
        named[path.stem] = path
    return [ModelEntry(index=i, name=name, weights=path, model=model, dataset=dataset, overrides=overrides)
            for i, (name, path) in enumerate(named.items())]


def resolve_models(spec: str, model: str, dataset: str, overrides: tuple[str, ...]) -> list[ModelEntry]:
    """The population ``models=`` names: a manifest file, a directory (its ``manifest.csv`` if it holds one, else
    its weights files) or a glob of weights files (these with ``model``, ``dataset`` and ``overrides``)."""
    text = str(spec).strip()
    if not text:
        raise ConfigError("models", "is empty; give a manifest (.csv), a directory of weights files or a glob")
    path = Path(text).expanduser()
    if not glob.has_magic(text):
        if path.is_dir() and (path / MANIFEST).is_file():
            return read_manifest(path / MANIFEST)
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise ConfigError("models", f"{path} is not a manifest (.csv); give a manifest, a directory of weights "
                                  "files or a glob such as 'models/*.safetensors'")
            return read_manifest(path)
        if not path.is_dir():
            raise ConfigError("models", f"nothing at {path}; give a manifest (.csv), a directory of weights files or "
                              "a glob")
    files, source = weights_files(text)
    return entries_from_files(files, source, model, dataset, overrides)
