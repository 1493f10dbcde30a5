"""One source of truth per default: every literal value in a shipped option's YAML equals its constructor's default."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from bdlab.compose import CONFIG_DIR, compose_config
from bdlab.errors import check_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def constructor_default(target: Any, key: str) -> Any:
    """The default of ``key`` in the first ``__init__`` along the MRO that names it (``inspect.Parameter.empty``
    when none gives one)."""
    classes = target.__mro__ if inspect.isclass(target) else [target]
    for cls in classes:
        function = cls.__init__ if inspect.isclass(cls) else cls
        parameters = inspect.signature(function).parameters
        if key in parameters:
            return parameters[key].default
    return inspect.Parameter.empty


def normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def nodes(group: str, option: str) -> list[Any]:
    node = compose_config([f"{group}={option}"])[group]
    if group == "model":
        return [node.net]
    if group == "analysis":
        return [] if node is None else list(node.values())
    return [node]


@pytest.mark.parametrize("group", ["dataset", "model", "attack", "defense", "analysis"])
def test_yaml_values_equal_constructor_defaults(group: str) -> None:
    disagreements = []
    for option in options(group):
        for node in nodes(group, option):
            target = get_object(node._target_)
            for key in node:
                if key.startswith("_") or OmegaConf.is_interpolation(node, key):
                    continue
                default = constructor_default(target, key)
                if default is inspect.Parameter.empty:
                    continue
                yaml_value = OmegaConf.to_container(node, resolve=True)[key]
                if normalise(yaml_value) != normalise(default):
                    disagreements.append(f"{group}={option}: {key} is {yaml_value!r} in YAML, {default!r} in the "
                                         "constructor")
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize("group", ["dataset", "model", "attack", "defense", "trainer", "logger", "analysis", "experiment",
                                   "sweep"])
def test_every_shipped_option_passes_the_type_check(group: str) -> None:
    """The constructors' type hints and the YAML agree: the check before any work refuses no shipped option."""
    for option in options(group):
        if not option.startswith("_"):
            key = f"+{group}" if group in ("experiment", "sweep") else group
            check_config(compose_config([f"{key}={option}", "logger=[csv,wandb]", "analysis=[saliency,grad_cam]"]
                                        if group not in ("logger", "analysis") else [f"{key}={option}"]))
