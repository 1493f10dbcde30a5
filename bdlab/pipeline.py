"""One run, end to end: data -> attack -> clean and trojaned models -> defense -> metrics.

Every input is validated before anything is trained or written (``ConfigError``); models
come from the artifact cache when an identical config built them before. The trojaned model's
cache entry also holds the state its attack learned (a trigger, a network), restored on a
cache hit before the poisoned sets are built from it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

from bdlab.analysis.base import Analysis
from bdlab.attacks.base import Attack, PoisonedSet
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.base import Defense
from bdlab.errors import ConfigError, build, check_config
from bdlab.evaluate import evaluate_attack
from bdlab.nsr import NSRSettings
from bdlab.services import RunServices, resolve_device
from bdlab.training.recipe import TrainingRecipe

log = logging.getLogger(__name__)

__all__ = ["Experiment", "execute", "poisoned_training_set", "prepare"]


@dataclass
class Experiment:
    """The validated objects of one run, built from its config before any training: the services
    (data, recipe, attack, models, cache), the defense and the analyses."""

    services: RunServices
    defense: Defense
    analyses: list[Analysis]

    @property
    def cfg(self) -> DictConfig:
        return self.services.cfg

    @property
    def data(self) -> DatasetSplits:
        return self.services.data

    @property
    def attack(self) -> Attack:
        return self.services.attack

    @property
    def recipe(self) -> TrainingRecipe:
        return self.services.recipe

    @property
    def timings(self) -> dict[str, float]:
        return self.services.timings

    def headline_metrics(self) -> list[tuple[str, str]]:
        """The (key, title) pairs the report draws tables of, as the attack, the defense and the
        analyses declare them, in that order."""
        declared = [*self.attack.headline_metrics, *self.defense.headline_metrics]
        for analysis in self.analyses:
            declared += analysis.headline_metrics
        return list(dict(declared).items())


def prepare(cfg: DictConfig, output_dir: str | Path = ".") -> Experiment:
    """Validate the recipe, load the data and instantiate attack, defense and analyses; raises
    ConfigError on any invalid value, before anything is trained or written."""
    check_config(cfg)
    recipe = TrainingRecipe.from_config(cfg)
    started = time.perf_counter()
    data: DatasetSplits = build(cfg.dataset).load()
    load_time = time.perf_counter() - started
    attack: Attack = build(cfg.attack)
    defense: Defense = build(cfg.defense)
    analyses: list[Analysis] = [build(node) for node in (cfg.get("analysis") or {}).values()]
    services = RunServices(cfg, data, recipe, attack, device=resolve_device(cfg.trainer), output_dir=output_dir)
    services.new_model()  # checks that the model accepts the dataset's input (and the given weights fit it)
    if not attack.trains and services.weights is None:
        raise ConfigError("model.weights", f"attack={attack.name} scans a model you give: set model.weights=PATH "
                          "(a .safetensors file or a torch.save'd state dict)")
    attack.setup(data, services)
    if not attack.trains and services.has_clean_reference():
        services.clean_model()  # a given clean reference is read (and refused in one line) before any work
    defense.setup(data, attack)
    defense.check_model(services.new_model())
    NSRSettings.from_config(cfg).check(services.new_model(), tuple(data.train.images.shape[1:]))
    for analysis in analyses:
        analysis.setup(data, attack)
        analysis.check_model(services.new_model())
    services.timings["data_load_s"] = load_time
    return Experiment(services, defense, analyses)


def poisoned_training_set(experiment: Experiment) -> PoisonedSet:
    """The training set the attacker hands over, outside a full run (export): attacks that learn
    their trigger get the trojaned model (from the cache, or trained) first, so the set carries
    the learned trigger."""
    services = experiment.services
    if services.attack.state_dict():
        services.trojan_model()
    return services.attack.poison_train(services.data.train, services.device)


def execute(experiment: Experiment, output_dir: Path, loggers: list[Logger]) -> dict[str, Any]:
    """Train (or reuse) both models, evaluate, defend; returns the metrics, the artifact records and the
    poisoned training and test sets (None without an attack)."""
    services, data, attack = experiment.services, experiment.data, experiment.attack
    services.loggers, services.output_dir = loggers, Path(output_dir)
    clean_model = services.clean_model() if services.has_clean_reference() else None
    trojan_model = services.trojan_model()
    if attack.has_poisoned_test:
        started = time.perf_counter()
        # after training, from the learned state: the set the attacker hands over and the test inputs
        if attack.trains:
            services.poisoned_train = attack.poison_train(data.train, services.device)
        services.poisoned_test = attack.poison_test(data.test, services.device)
        services.timings["poison_sets_s"] = time.perf_counter() - started

    started = time.perf_counter()
    metrics, services.undefended = evaluate_attack(clean_model, trojan_model, services,
                                                   NSRSettings.from_config(experiment.cfg))
    services.timings["evaluate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    metrics.update(experiment.defense.run(services))
    services.timings["defense_s"] = time.perf_counter() - started
    for analysis in experiment.analyses:
        started = time.perf_counter()
        metrics.update(analysis.run(services))
        services.timings[f"analysis_{analysis.name}_s"] = time.perf_counter() - started
    return {"metrics": metrics, "artifacts": services.artifacts, "poisoned_train": services.poisoned_train,
            "poisoned_test": services.poisoned_test}
