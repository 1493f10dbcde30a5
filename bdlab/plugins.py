"""Methods outside the tree: packages named in ``BDLAB_PLUGINS`` are imported and their config groups join Hydra's
search path, so ``attack=<theirs>`` and ``defense=<theirs>`` resolve like bdlab's own options.

``BDLAB_PLUGINS`` holds comma-separated importable package names (``BDLAB_PLUGINS=my_backdoors,other``). For
each, bdlab imports the package (its ``_target_`` classes then resolve, and whatever it registers on import is
registered) and appends its config directory to the search path, after bdlab's own ``conf/`` (an option of the
same name in both is bdlab's): ``pkg://<package>.conf`` when the package holds a ``conf/__init__.py``,
``file://<package dir>/conf`` for a ``conf/`` folder without one, or what the package's ``BDLAB_SEARCHPATH``
attribute names (a string or a list of ``pkg://`` / ``file://`` entries). A package without any adds code only.

The search path is extended by a Hydra :class:`~hydra.plugins.search_path_plugin.SearchPathPlugin` that
:func:`install` registers, so ``python -m bdlab.run`` (``@hydra.main``), :func:`bdlab.compose.compose_config`
(the Python API, export, bench) and ``-m`` grids (the launchers' jobs reuse the search path of the process that
composed the grid; the variable is inherited by worker processes anyway) all see the same options. Hydra's own
``hydra.searchpath=[pkg://my_backdoors.conf]`` works as well, for one command line.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig

from bdlab.errors import ConfigError

#: the environment variable naming the plugin packages
ENV = "BDLAB_PLUGINS"
#: a plugin package's optional attribute naming its config directories (a string or a list of search path entries)
SEARCHPATH_ATTRIBUTE = "BDLAB_SEARCHPATH"
_SCHEMES = ("pkg://", "file://")


def plugin_names(value: str | None = None) -> list[str]:
    """The package names in ``value`` (by default ``$BDLAB_PLUGINS``), in order, without blanks or repeats."""
    value = os.environ.get(ENV, "") if value is None else value
    names: list[str] = []
    for name in (part.strip() for part in value.split(",")):
        if not name or name in names:
            continue
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(ENV, f"{name!r} is not a package name; give importable names separated by commas "
                                   "(BDLAB_PLUGINS=my_backdoors,other_package)")
        names.append(name)
    return names


def load(names: Iterable[str] | None = None) -> list[ModuleType]:
    """Import the plugin packages (by default those of ``$BDLAB_PLUGINS``); one that cannot be imported is one
    ConfigError line. An error other than a failed import inside a plugin's own code propagates as it is."""
    modules = []
    for name in plugin_names() if names is None else list(names):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise ConfigError(ENV, f"cannot import {name!r} ({error}); install it, or put the folder that holds it "
                                   "on PYTHONPATH") from None
    return modules


def searchpath(package: ModuleType) -> list[str]:
    """The Hydra search path entries of one plugin package: its ``BDLAB_SEARCHPATH``, else its ``conf/``."""
    declared = getattr(package, SEARCHPATH_ATTRIBUTE, None)
    if declared is not None:
        entries = [declared] if isinstance(declared, str) else list(declared)
        for entry in entries:
            if not isinstance(entry, str) or not entry.startswith(_SCHEMES):
                raise ConfigError(ENV, f"{package.__name__}.{SEARCHPATH_ATTRIBUTE} holds {entry!r}; each entry is "
                                       "'pkg://<package>.<folder>' or 'file://<absolute folder>'")
        return entries
    for folder in map(Path, getattr(package, "__path__", ())):  # a plain module (no __path__) adds code only
        conf = folder / "conf"
        if conf.is_dir():
            return [f"pkg://{package.__name__}.conf" if (conf / "__init__.py").is_file() else
                    f"file://{conf.resolve()}"]
    return []


def plugin_searchpath(names: Iterable[str] | None = None) -> list[str]:
    """Every plugin's search path entries, in the order of ``$BDLAB_PLUGINS`` (importing the plugins)."""
    return [entry for package in load(names) for entry in searchpath(package)]


class BdlabPluginSearchPath(SearchPathPlugin):
    """Appends the config directories of the ``BDLAB_PLUGINS`` packages to Hydra's search path (registered by
    :func:`install`; Hydra calls it whenever it builds a search path)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for name in plugin_names():
            for entry in plugin_searchpath([name]):
                search_path.append(provider=f"bdlab-plugin:{name}", path=entry)


def install() -> None:
    """Register :class:`BdlabPluginSearchPath` with Hydra (once per process; cheap after the first call).

    Called by :func:`bdlab.compose.compose_config` and the command line before Hydra builds its search path."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    if BdlabPluginSearchPath not in plugins.discover(SearchPathPlugin):
        plugins.register(BdlabPluginSearchPath)


def _repository(extra: Iterable[str] = ()) -> Any:
    """Hydra's config repository over the whole search path: bdlab's ``conf/``, the plugins' and ``extra``."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path

    from bdlab.compose import CONFIG_DIR

    install()
    search_path = create_config_search_path(str(CONFIG_DIR))
    for entry in extra:
        search_path.append(provider="hydra.searchpath", path=str(entry))
    return ConfigRepository(config_search_path=search_path)


def group_options(group: str, extra: Iterable[str] = ()) -> list[str] | None:
    """The options of config group ``group`` on the whole search path (bdlab's ``conf/``, the plugins' and the
    ``extra`` entries, e.g. a config's ``hydra.searchpath``), or None when no source has the group."""
    from hydra.core.object_type import ObjectType

    repository = _repository(extra)
    if not repository.group_exists(group):
        return None
    return sorted(repository.get_group_options(group, results_filter=ObjectType.CONFIG))


def load_option(group: str, name: str, extra: Iterable[str] = ()) -> DictConfig | None:
    """The YAML of option ``group/name`` as written (uncomposed: ``${seed}`` stays an interpolation) from the
    first source on the search path that has it, or None: for code that builds an option by name (a given
    model's ``trigger``, an ``inspector: neural_cleanse``) and should find the plugins' options too."""
    loaded = _repository(extra).load_config(f"{group}/{name}")
    return None if loaded is None else loaded.config
