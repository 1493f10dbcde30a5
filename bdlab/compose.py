"""Compose bdlab's Hydra config outside ``@hydra.main`` (benchmarks, exports, notebooks, tests)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bdlab import plugins

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The run config for ``overrides``, exactly as ``python -m bdlab.run`` would see it: the option groups of
    the ``BDLAB_PLUGINS`` packages (:mod:`bdlab.plugins`) and of a ``hydra.searchpath=[...]`` override included.
    An unimportable plugin is one ConfigError line (``BDLAB_PLUGINS: ...``)."""
    plugins.plugin_searchpath()  # a bad name is one line here, not a traceback out of Hydra's search path
    plugins.install()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []))
