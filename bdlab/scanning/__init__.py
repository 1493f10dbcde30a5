"""Scanning populations of models (``python -m bdlab.scan``, docs/scanning.md): the population
(:mod:`~bdlab.scanning.manifest`), the scanners (:mod:`~bdlab.scanning.scanners`), the scan itself
(:mod:`~bdlab.scanning.runner`, :mod:`~bdlab.scanning.progress`), each scanner's figures over the population
(:mod:`~bdlab.scanning.population`), the files and pictures (:mod:`~bdlab.scanning.outputs`,
:mod:`~bdlab.scanning.pictures`) and the merge of a sharded scan (:mod:`~bdlab.scanning.merge`)."""

from bdlab.scanning.manifest import ModelEntry, read_manifest, resolve_models
from bdlab.scanning.population import Verdict, detection_rates, population_metrics

__all__ = ["ModelEntry", "Verdict", "detection_rates", "population_metrics", "read_manifest", "resolve_models"]
