"""What a grid's cells need before they run, derived from their configs without loading data or training.

Each cell of a ``-m`` grid asks the artifact cache for the same few things: the clean reference model, its
trojaned model and, for some defenses, an artifact shared by every cell of that defense: a model inspection's
verdict on the clean model (Neural Cleanse, TABOR, K-Arm, ...) or a helper network trained on the clean data
alone (MagNet's autoencoder). :func:`cell_artifacts` names them from one cell's config: the models by their
exact cache keys (:func:`bdlab.services.model_spec`), the shared artifacts by a *plan key* over the config that
determines them (their cache keys include a digest of the loaded images, which a plan does not load).
:func:`plan_grid` composes every cell (:class:`CellComposer`: the 448 cells of ``trojanzoo`` from a handful of
compositions, the attack and defense options grafted in) and deduplicates what they need into :class:`GridPlan`, whose artifacts the two-phase sweeper (:mod:`bdlab.sweeping.sweeper`)
builds first, one job each.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from bdlab.cache import MANIFEST, TENSORS, ArtifactCache, spec_hash

#: artifact kinds, in the order a phase-1 job list starts them (what others build on comes first)
KINDS = ("clean", "trojan", "autoencoder", "inspection")


@dataclass(frozen=True)
class Artifact:
    """One thing a cell needs built before it runs.

    ``key`` is the model's cache key (``clean``, ``trojan``) or a plan key (``inspection``, ``autoencoder``);
    ``path`` is the cache entry where the key is the cache's own (None otherwise); ``needs`` are the keys of
    the artifacts it is built from (an inspection of the clean model needs that model); ``data`` (models) is
    the key of the dataset part of its spec."""

    key: str
    kind: str
    label: str
    path: Path | None = None
    needs: tuple[str, ...] = ()
    data: str | None = None

    def cached(self) -> bool | None:
        """Whether the cache holds it already; None where only a job that loads the data can tell."""
        if self.path is None:
            return None
        return (self.path / TENSORS).is_file() and (self.path / MANIFEST).is_file()


@dataclass
class Cell:
    """One job of the grid: its overrides, its names (attack, defense, ...) and the keys of what it needs."""

    index: int
    overrides: list[str]
    names: dict[str, str]
    needs: list[str] = field(default_factory=list)
    #: why its needs could not be derived (the cell then runs as it would without a plan, and fails on its own)
    problem: str | None = None

    @property
    def name(self) -> str:
        return "/".join(self.names.get(part, "?") for part in ("attack", "defense"))


@dataclass
class GridPlan:
    """The cells in launch order and the distinct artifacts they need, keyed by artifact key."""

    cells: list[Cell]
    artifacts: dict[str, Artifact]

    def first_cell(self, key: str, cells: Sequence[Cell] | None = None) -> Cell:
        """The first cell (of ``cells``, default all) that needs artifact ``key``: its overrides build it."""
        return next(cell for cell in (self.cells if cells is None else cells) if key in cell.needs)

    def missing(self) -> list[Artifact]:
        """The artifacts to build, ``KINDS`` order: those the cache does not hold (or cannot say it holds)."""
        todo = [artifact for artifact in self.artifacts.values() if artifact.cached() is not True]
        return sorted(todo, key=lambda artifact: KINDS.index(artifact.kind))

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for artifact in self.artifacts.values():
            found[artifact.kind] = found.get(artifact.kind, 0) + 1
        return found


def without_locations(node: dict[str, Any]) -> dict[str, Any]:
    """A resolved node less the keys that locate files rather than determine content, as cache keys leave them."""
    from bdlab.services import _LOCATION_KEYS

    return {key: value for key, value in node.items() if key not in _LOCATION_KEYS}


@functools.lru_cache(maxsize=32)
def _fingerprint(dataset_json: str) -> str | None:
    """The content digest of own data, as its loader computes it, read from the files without decoding or
    caching anything (image folders and tensor files); None for datasets whose config determines the images."""
    from bdlab.datasets.image_folder import ImageFolder, find_images, scan
    from bdlab.datasets.tensors import TensorFile
    from bdlab.errors import build

    dataset = build(OmegaConf.create(json.loads(dataset_json)), "dataset")
    if isinstance(dataset, TensorFile):
        from bdlab.cache import file_digest

        return file_digest(dataset.path)
    if isinstance(dataset, ImageFolder):
        return scan(find_images(dataset.root)[1], dataset.root)[0]
    return None


def dataset_fingerprint(cfg: DictConfig) -> str | None:
    return _fingerprint(json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True))


def _shares_clean_inspection(defense_class: type) -> bool:
    from bdlab.defenses.model_inspection.base import ModelInspection

    return issubclass(defense_class, ModelInspection)


def _trains_helper_on_clean_data(defense_class: type) -> bool:
    # a defense whose ``autoencoder(services)`` trains a network on the clean training set alone (MagNet)
    return callable(getattr(defense_class, "autoencoder", None))


def model_artifacts(cfg: DictConfig, names: dict[str, str], cache: ArtifactCache) -> list[Artifact]:
    """The models a cell needs, in the order it asks for them: the clean reference, then the trojaned model.
    ``cfg`` holds the cell's dataset, model, attack, trainer, optimizer, scheduler and seed. A given model
    (``attack.trains`` false) needs nothing built."""
    from bdlab.attacks.base import NoAttack
    from bdlab.services import model_spec

    attack_class = get_class(str(cfg.attack._target_))
    if not getattr(attack_class, "trains", True):
        return []
    where = f"{names.get('model', '?')} on {names.get('dataset', '?')} (seed {cfg.seed})"
    fingerprint = dataset_fingerprint(cfg)
    clean_spec = model_spec(cfg, with_attack=False, fingerprint=fingerprint)
    needs = [Artifact(spec_hash(clean_spec), "clean", f"clean model: {where}", cache.path("models/clean", clean_spec),
                      data=spec_hash({"dataset": clean_spec["dataset"]}))]
    if not issubclass(attack_class, NoAttack):
        spec = model_spec(cfg, with_attack=True, fingerprint=fingerprint)
        needs.append(Artifact(spec_hash(spec), "trojan", f"trojaned model: {names.get('attack', '?')}, {where}",
                              cache.path("models/trojan", spec)))
    return needs


def shared_artifact(clean: Artifact, defense: dict[str, Any], names: dict[str, str]) -> Artifact | None:
    """The artifact the cell's defense shares with every cell of that defense on the same clean model: its
    inspection of the clean model, or the helper network it trains on the clean data; None for the others."""
    defense_class = get_class(str(defense["_target_"]))
    settings = without_locations(defense)
    if _shares_clean_inspection(defense_class):
        key = spec_hash({"artifact": "inspection", "model": clean.key, "defense": settings})
        where = clean.label.removeprefix("clean model: ")
        return Artifact(key, "inspection", f"{names.get('defense', '?')} inspection of the clean model: {where}",
                        needs=(clean.key,))
    if _trains_helper_on_clean_data(defense_class):
        # keyed by the clean model's data part: the same training set, whatever the model
        key = spec_hash({"artifact": "autoencoder", "data": clean.data, "defense": settings})
        return Artifact(key, "autoencoder", f"{names.get('defense', '?')} autoencoder on {names.get('dataset', '?')}")
    return None


def cell_artifacts(cfg: DictConfig, defense: dict[str, Any], names: dict[str, str],
                   cache: ArtifactCache) -> list[Artifact]:
    """What one cell needs built, in the order it asks for it (:func:`model_artifacts`, then
    :func:`shared_artifact`); ``defense`` is its resolved defense node."""
    needs = model_artifacts(cfg, names, cache)
    shared = shared_artifact(needs[0], defense, names) if needs else None
    return needs + ([shared] if shared is not None else [])


def override_key(element: str) -> str:
    """The key of one ``key=value`` override, less its ``+``/``++``/``~`` prefix."""
    return element.split("=", 1)[0].lstrip("+~")


def is_defense_axis(element: str) -> bool:
    key = override_key(element)
    return key == "defense" or key.startswith(("defense.", "defense/"))


@functools.lru_cache(maxsize=None)
def simple_option(group: str, name: str, searchpath: tuple[str, ...] = ()) -> DictConfig | None:
    """Option ``group/name`` as written, when composing it adds nothing else: its file has no defaults list and
    no ``@package`` of its own, so the composed config's ``group`` node is this file. None otherwise (or when
    ``group`` is no config group)."""
    from bdlab.plugins import _repository

    try:
        loaded = _repository(searchpath).load_config(f"{group}/{name}")
    except Exception:  # not a group option at all (a field override): composed as Hydra would
        return None
    if loaded is None or loaded.defaults_list or loaded.header.get("package") not in (None, "", group):
        return None
    return loaded.config


class CellComposer:
    """Every cell's config from a few Hydra compositions: one per distinct value of the overrides that are not
    plain group choices (``seed=3``, ``attack.poison_rate=0.1``, an option with a defaults list of its own),
    with each plain choice (``attack=wanet``, ``defense=strip``) grafted in with OmegaConf as the option's file.
    Grafting is exact where the group's node is its option's file alone: each composition is checked for that
    (a sweep file or the primary config that sets fields of the group makes its cells composed whole).

    ``compose(overrides)`` returns the config Hydra's launcher gives a job with those overrides; ``option(group,
    name)`` a plain option's file, or None (default :func:`simple_option`)."""

    def __init__(self, compose: Callable[[list[str]], DictConfig], cells: Sequence[Sequence[str]],
                 option: Callable[[str, str], DictConfig | None] | None = None) -> None:
        self.compose, self.cells = compose, [list(cell) for cell in cells]
        self.option = option or simple_option
        self._composed: dict[tuple[str, ...], DictConfig] = {}
        # per position, the first plain choice there: what a composition holds in that place
        self._template: dict[int, str] = {}
        for cell in self.cells:
            for position, element in enumerate(cell):
                if self._plain(element) is not None:
                    self._template.setdefault(position, element)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one composer per plan
    def _plain(self, element: str) -> tuple[str, DictConfig] | None:
        key, _, value = element.partition("=")
        if key != key.lstrip("+~") or "." in key or "/" in key or not value:
            return None
        node = self.option(key, value)
        return None if node is None else (key, node)

    def _config(self, overrides: tuple[str, ...]) -> DictConfig:
        if overrides not in self._composed:
            self._composed[overrides] = self.compose(list(overrides))
        return self._composed[overrides]

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def _graftable(self, base: tuple[str, ...], group: str, template: str) -> bool:
        plain = self._plain(template)
        return plain is not None and OmegaConf.to_container(self._config(base)[group], resolve=False) == \
            OmegaConf.to_container(plain[1], resolve=False)

    @contextmanager
    def config(self, index: int) -> Iterator[tuple[DictConfig, dict[str, Any], dict[str, str]]]:
        """Cell ``index``'s config (with the ``hydra`` node; grafted in place, so valid inside the block only), its
        resolved defense node and its names (dataset, model, attack, defense options)."""
        cell = self.cells[index]
        base = tuple(self._template[i] if self._plain(e) is not None else e for i, e in enumerate(cell))
        grafts = {i: e for i, e in enumerate(cell) if self._plain(e) is not None and e != self._template[i]}
        if not all(self._graftable(base, self._plain(e)[0], self._template[i]) for i, e in grafts.items()):
            base, grafts = tuple(cell), {}
        cfg = self._config(base)
        choices = dict(cfg.hydra.runtime.choices)
        originals = {}
        with open_dict(cfg):
            try:
                for element in grafts.values():
                    group, node = self._plain(element)
                    originals[group] = cfg[group]
                    cfg[group] = node  # assignment copies the node: the loaded file stays as it is
                    choices[group] = element.partition("=")[2]
                names = {"dataset": str(choices.get("dataset", "?")), "model": str(cfg.model.get("name", "?")),
                         "attack": str(choices.get("attack", "?")), "defense": str(choices.get("defense", "?"))}
                yield cfg, OmegaConf.to_container(cfg.defense, resolve=True), names
            finally:
                for group, node in originals.items():
                    cfg[group] = node

    def model_side(self, index: int) -> tuple[str, ...]:
        """What determines cell ``index``'s models: its overrides but the defense's (cells that share it share
        their models, whatever their defense)."""
        return tuple(e for e in self.cells[index] if not is_defense_axis(e))


def plan_grid(compose: Callable[[list[str]], DictConfig], cells: Sequence[Sequence[str]],
              cache_root: str | Path | None = None) -> GridPlan:
    """The grid's cells (``cells``: each one's overrides, in launch order) and the distinct artifacts they need.
    A cell whose config cannot be composed or read keeps no needs and a ``problem``: it runs as it would
    without a plan and records its own failure."""
    composer = CellComposer(compose, cells)
    plan = GridPlan([], {})
    models: dict[tuple[str, ...], list[Artifact]] = {}
    shared: dict[tuple[str, str], Artifact | None] = {}
    for index, overrides in enumerate(composer.cells):
        cell = Cell(index, list(overrides), {})
        try:
            with composer.config(index) as (cfg, defense, cell.names):
                model_side = composer.model_side(index)
                if model_side not in models:
                    cache = ArtifactCache(cache_root if cache_root is not None else cfg.cache_dir)
                    models[model_side] = model_artifacts(cfg, cell.names, cache)
            needs = list(models[model_side])
            if needs:
                key = (needs[0].key, json.dumps(defense, sort_keys=True, default=str))
                if key not in shared:
                    shared[key] = shared_artifact(needs[0], defense, cell.names)
                needs += [shared[key]] if shared[key] is not None else []
        except Exception as error:  # a bad cell is the cell's own failure, recorded when it runs
            cell.problem = f"{type(error).__name__}: {error}".splitlines()[0]
            needs = []
        for artifact in needs:
            plan.artifacts.setdefault(artifact.key, artifact)
            cell.needs.append(artifact.key)
        plan.cells.append(cell)
    return plan
