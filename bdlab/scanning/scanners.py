"""Scanners: the ``conf/defense`` options of the model-inspection category, each built from its own YAML defaults
(plus the scan's ``scanner_args.<name>`` fields) and checked against a population's data before any work."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.model_inspection.base import ModelInspection
from bdlab.errors import ConfigError, build
from bdlab.plugins import group_options, load_option
from bdlab.services import RunServices


def defense_class(name: str) -> type | None:
    """The class a ``conf/defense`` option builds, or None when it names none that imports."""
    node = load_option("defense", name)
    target = node.get("_target_") if node is not None else None
    try:
        return get_class(str(target)) if target else None
    except (ImportError, ValueError, AttributeError):
        return None


def inspector_options() -> list[str]:
    """The ``conf/defense`` options (plugins' included) that are model inspectors: the valid scanners."""
    return [name for name in group_options("defense") or []
            if isinstance(cls := defense_class(name), type) and issubclass(cls, ModelInspection)]


def check_scanners(scanners: Any, scanner_args: Mapping[str, Any]) -> list[str]:
    """The scanner names, refused in one line when empty, repeated, unknown (the valid ones listed) or not a model
    inspector; ``scanner_args`` may only name scanners of the scan."""
    names = [scanners] if isinstance(scanners, str) else list(scanners or [])
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigError("scanners", f"got {names!r}; give model inspectors, e.g. scanners=[neural_cleanse,k_arm]")
    valid = inspector_options()
    for name in names:
        if name in valid:
            continue
        cls = defense_class(name) if name in (group_options("defense") or []) else None
        if cls is not None:
            raise ConfigError("scanners", f"{name} is not a model inspector (its category is "
                              f"{getattr(cls, 'category', 'unknown')}); valid: {', '.join(valid)}")
        raise ConfigError("scanners", f"no scanner {name!r}; valid: {', '.join(valid)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError("scanners", f"{', '.join(repeated)} given twice; name each scanner once")
    for name in scanner_args:
        if name not in names:
            raise ConfigError(f"scanner_args.{name}", f"{name} is not among the scanners ({', '.join(names)}); add it "
                              "to scanners= or drop its arguments")
    return names


def renamed(error: ConfigError, scanner: str) -> ConfigError:
    """A ``defense.<field>`` error as the scan's ``scanner_args.<scanner>.<field>``, where the user sets it."""
    if error.field == "defense" or error.field.startswith("defense."):
        return ConfigError(f"scanner_args.{scanner}{error.field.removeprefix('defense')}", error.message)
    return error


def build_scanner(cfg: DictConfig, scanner: str, args: Mapping[str, Any] | None) -> ModelInspection:
    """The inspector of a run config composed with ``defense=<scanner>``, its fields changed by ``args``; errors
    name ``scanner_args.<scanner>.<field>``."""
    node = cfg.defense
    if args:
        OmegaConf.set_struct(node, False)
        node.merge_with(OmegaConf.create(dict(args)))
    try:
        inspector = build(node, path="defense")
    except ConfigError as error:
        raise renamed(error, scanner) from None
    if not isinstance(inspector, ModelInspection):  # a plugin's option whose class changed since it was listed
        raise ConfigError("scanners", f"{scanner} is not a model inspector")
    return inspector


def check_scanner(inspector: ModelInspection, scanner: str, data: DatasetSplits, services: RunServices) -> None:
    """What a run checks before any work: enough held-out images, layers the architecture has."""
    try:
        inspector.setup(data, services.attack)
        inspector.check_model(services.new_model())
    except ConfigError as error:
        raise renamed(error, scanner) from None


def scanner_settings(inspectors: Mapping[str, ModelInspection]) -> dict[str, dict[str, Any]]:
    """Each scanner's settings as its cache key has them, with its threshold and suspicious side (for scan.json)."""
    return {name: {**inspector.settings(), "aiv_threshold": inspector.aiv_threshold, "suspicious": inspector.suspicious,
                   "seed": inspector.seed} for name, inspector in inspectors.items()}
