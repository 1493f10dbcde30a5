"""One run, end to end: data -> attack -> clean and trojaned models -> defense -> metrics.

Every input is validated before anything is trained or written (``ConfigError``); models
come from the artifact cache when an identical config built them before. The trojaned model's
cache entry also holds the state its attack learned (a trigger, a network), restored on a
cache hit before the poisoned sets are built from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from bdlab.analysis.base import Analysis
from bdlab.attacks.base import Attack, NoAttack, PoisonedSet
from bdlab.cache import ArtifactCache, Tensors, spec_hash
from bdlab.context import RunContext
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.defenses.base import Defense
from bdlab.errors import build
from bdlab.evaluate import evaluate
from bdlab.models.classifier import Classifier, build_classifier
from bdlab.nsr import NSRSettings
from bdlab.stealth import stealthiness
from bdlab.training.augment import TrainAugment
from bdlab.training.fit import fit, fit_classifier, training_batches
from bdlab.training.recipe import TrainingRecipe

log = logging.getLogger(__name__)

# config keys that say where things live, not what they are: never part of a cache key
_LOCATION_KEYS = ("root", "download", "system_dir", "cache_dir")
MODEL_PREFIX, ATTACK_PREFIX = "model/", "attack/"


def _without_locations(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in _LOCATION_KEYS}


@dataclass
class Experiment:
    """The validated objects of one run, built from its config before any training."""

    cfg: DictConfig
    recipe: TrainingRecipe
    data: DatasetSplits
    attack: Attack
    defense: Defense
    analyses: list[Analysis]
    device: torch.device
    resources: RunResources = field(init=False)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resources = RunResources(self, ArtifactCache(self.cfg.cache_dir))

    def new_model(self, seed: int | None = None) -> Classifier:
        """A freshly initialised classifier; seeded (by the run's seed unless ``seed`` is given) so the
        clean and trojaned models start identical."""
        pl.seed_everything(self.recipe.seed if seed is None else seed, verbose=False)
        return build_classifier(build(self.cfg.model.net), self.data.input_shape, self.data.num_classes,
                                self.data.mean, self.data.std)

    def augment(self) -> TrainAugment:
        return TrainAugment(self.data.crop_padding, self.data.hflip)

    def headline_metrics(self) -> list[tuple[str, str]]:
        """The (key, title) pairs the report draws tables of, as the attack, the defense and the
        analyses declare them, in that order."""
        declared = [*self.attack.headline_metrics, *self.defense.headline_metrics]
        for analysis in self.analyses:
            declared += analysis.headline_metrics
        return list(dict(declared).items())


def resolve_device(trainer_cfg: DictConfig) -> torch.device:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def prepare(cfg: DictConfig) -> Experiment:
    """Validate the recipe, load the data and instantiate attack, defense and analyses; raises
    ConfigError on any invalid value, before anything is trained or written."""
    recipe = TrainingRecipe.from_config(cfg)
    started = time.perf_counter()
    data: DatasetSplits = build(cfg.dataset).load()
    load_time = time.perf_counter() - started
    attack: Attack = build(cfg.attack)
    defense: Defense = build(cfg.defense)
    analyses: list[Analysis] = [build(node) for node in (cfg.get("analysis") or {}).values()]
    experiment = Experiment(cfg, recipe, data, attack, defense, analyses, resolve_device(cfg.trainer))
    experiment.new_model()  # checks that the model accepts the dataset's input
    attack.setup(data, experiment.resources)
    defense.setup(data, attack)
    defense.check_model(experiment.new_model())
    NSRSettings.from_config(cfg).check(experiment.new_model(), tuple(data.train.images.shape[1:]))
    for analysis in analyses:
        analysis.setup(data, attack)
        analysis.check_model(experiment.new_model())
    experiment.timings["data_load_s"] = load_time
    return experiment


def training_processes(trainer: dict[str, Any]) -> int:
    """How many processes train one model: ``devices`` (a count or a list) x ``num_nodes`` under DDP, else 1."""
    if "ddp" not in str(trainer.get("strategy", "auto")):
        return 1
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1
    return count * int(trainer.get("num_nodes", 1))


def model_spec(cfg: DictConfig, with_attack: bool) -> dict[str, Any]:
    """Exactly the config that determines a trained model (never the defense, logger or paths)."""
    dataset = _without_locations(cfg.dataset)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    recipe = {"max_epochs": trainer.get("max_epochs"), "precision": trainer.get("precision")}
    processes = training_processes(trainer)
    if processes > 1:  # DDP: each step sees processes x batch_size images, so the model differs
        recipe["processes"] = processes
    return {
        "dataset": dataset,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        "recipe": recipe,
        "attack": _without_locations(cfg.attack) if with_attack else None,
        "seed": int(cfg.seed),
    }


def unprefixed(tensors: Tensors, prefix: str) -> Tensors:
    """The entries of one part of a cache entry (``model/``, ``attack/``) under their own names."""
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def same_keys(model: torch.nn.Module) -> Any:
    """A cache-entry check: the entry holds exactly ``model``'s state-dict keys."""
    expected = set(model.state_dict())
    return lambda tensors: set(tensors) == expected


class RunResources:
    """The run's shared resources (:class:`~bdlab.attacks.base.Resources`): the artifact cache, the
    device, clean models of any seed (cached, trained on first use), the trojaned model, and
    retraining for defenses. ``artifacts`` records every model it handed out for ``results.json``."""

    def __init__(self, experiment: Experiment, cache: ArtifactCache) -> None:
        self.experiment = experiment
        self.cache = cache
        self.loggers: list[Logger] = []
        self.artifacts: dict[str, dict[str, Any]] = {}
        self._clean: dict[int, Classifier] = {}

    @property
    def device(self) -> torch.device:
        return self.experiment.device

    def fresh_model(self) -> Classifier:
        return self.experiment.new_model()

    def clean_spec(self, seed: int | None = None) -> dict[str, Any]:
        spec = model_spec(self.experiment.cfg, with_attack=False)
        return spec if seed is None else {**spec, "seed": int(seed)}

    def clean_key(self, seed: int | None = None) -> str:
        return spec_hash(self.clean_spec(seed))

    def clean_model(self, seed: int | None = None) -> Classifier:
        seed = self.experiment.recipe.seed if seed is None else int(seed)
        if seed not in self._clean:
            spec = self.clean_spec(seed)
            model, reused = self.trained_model("clean", spec, self.experiment.data.train)
            if seed == self.experiment.recipe.seed:
                self.artifacts["clean_model"] = {"path": str(self.cache.path("models/clean", spec)), "reused": reused}
            self._clean[seed] = model
        return self._clean[seed]

    def trained_model(self, kind: str, spec: dict[str, Any], train: ImageSet) -> tuple[Classifier, bool]:
        """The model for ``spec`` from the cache, or trained on ``train`` with the victim module and stored."""
        experiment, seed = self.experiment, int(spec["seed"])
        model = experiment.new_model(seed)

        def train_state() -> Tensors:
            started = time.perf_counter()
            fit_classifier(model, train, experiment.recipe, experiment.augment(), loggers=self.loggers, name=kind,
                           seed=seed)
            experiment.timings[f"{kind}_train_s"] = time.perf_counter() - started
            return model.state_dict()

        state, reused = self.cache.get_or_build(f"models/{kind}", spec, train_state, same_keys(model))
        if reused:
            model.load_state_dict(state)
        return model.to(self.device).eval(), reused

    def retrain(self, train: ImageSet, tag: str) -> Classifier:
        """A fresh model trained with the run's recipe on ``train`` (a filtered training set), cached by content."""
        spec = {**self.clean_spec(), "retrain": tag, "train_content": tensor_digest(train)}
        model, reused = self.trained_model("retrained", spec, train)
        self.artifacts[f"retrained_{tag}"] = {"path": str(self.cache.path("models/retrained", spec)), "reused": reused}
        return model

    def trojan_key(self) -> str:
        """The trojaned model's cache key (the clean model's without an attack)."""
        if isinstance(self.experiment.attack, NoAttack):
            return self.clean_key()
        return spec_hash(model_spec(self.experiment.cfg, with_attack=True))

    def trojan_model(self) -> Classifier:
        """The trojaned model with its attack's learned state restored: from the cache, or trained."""
        experiment, attack = self.experiment, self.experiment.attack
        spec = model_spec(experiment.cfg, with_attack=True)
        model = attack.model_shell(experiment.new_model())
        expected = {MODEL_PREFIX + k for k in model.state_dict()} | {ATTACK_PREFIX + k for k in attack.state_dict()}

        def train_state() -> Tensors:
            trained = train_trojan(experiment, self.loggers)
            return {**{MODEL_PREFIX + k: v for k, v in trained.state_dict().items()},
                    **{ATTACK_PREFIX + k: v for k, v in attack.state_dict().items()}}

        tensors, reused = self.cache.get_or_build("models/trojan", spec, train_state,
                                                  lambda found: set(found) == expected)
        model.load_state_dict(unprefixed(tensors, MODEL_PREFIX))
        attack.load_state_dict(unprefixed(tensors, ATTACK_PREFIX))
        self.artifacts["trojan_model"] = {"path": str(self.cache.path("models/trojan", spec)), "reused": reused}
        return model.to(self.device).eval()


def trojan_training(experiment: Experiment) -> tuple[Classifier, pl.LightningModule, PoisonedSet]:
    """The attack's starting model, its training module and the training set it gets (poisoning,
    and any trigger the attack learns before training, happen here)."""
    attack, recipe = experiment.attack, experiment.recipe
    model = attack.initial_model(experiment.new_model())
    train_set = attack.training_set(experiment.data.train, experiment.device)
    module = attack.training_module(model, training_batches(train_set, recipe, recipe.seed), recipe,
                                    experiment.augment(), "trojan")
    return model, module, train_set


def train_trojan(experiment: Experiment, loggers: list[Logger]) -> Classifier:
    """Train the trojaned model with the attack's LightningModule (timings: ``poison_s``, ``trojan_train_s``)."""
    started = time.perf_counter()
    model, module, train_set = trojan_training(experiment)
    experiment.timings["poison_s"] = time.perf_counter() - started
    started = time.perf_counter()
    model.train()
    fit(module, experiment.recipe, experiment.recipe.seed, loggers,
        f"trojan model ({experiment.attack.display_name}) on {len(train_set)} images")
    experiment.timings["trojan_train_s"] = time.perf_counter() - started
    return model.eval()


def poisoned_training_set(experiment: Experiment) -> PoisonedSet:
    """The training set the attacker hands over, outside a full run (export): attacks that learn
    their trigger get the trojaned model (from the cache, or trained) first, so the set carries
    the learned trigger."""
    if experiment.attack.state_dict():
        experiment.resources.trojan_model()
    return experiment.attack.poison_train(experiment.data.train, experiment.device)


def execute(experiment: Experiment, output_dir: Path, loggers: list[Logger]) -> dict[str, Any]:
    """Train (or reuse) both models, evaluate, defend; returns the metrics, the artifact records and the
    poisoned training and test sets (None without an attack)."""
    data, attack, resources = experiment.data, experiment.attack, experiment.resources
    resources.loggers = loggers
    clean_model = resources.clean_model()
    poisoned_train: PoisonedSet | None = None
    poisoned_test: ImageSet | None = None
    if isinstance(attack, NoAttack):
        trojan_model = clean_model
    else:
        trojan_model = resources.trojan_model()
        started = time.perf_counter()
        # after training, from the learned state: the set the attacker hands over and the test inputs
        poisoned_train = attack.poison_train(data.train, experiment.device)
        poisoned_test = attack.poison_test(data.test, experiment.device)
        experiment.timings["poison_sets_s"] = time.perf_counter() - started

    started = time.perf_counter()
    # the clean model on the triggered inputs too: how often the trigger alone, without a backdoor, hits the target
    metrics = evaluate(clean_model, data.test, poisoned_test, attack.target_class).metrics("clean")
    undefended = evaluate(trojan_model, data.test, poisoned_test, attack.target_class)
    metrics.update(undefended.metrics("trojan"))
    metrics["attack/cad"] = metrics["clean/acc"] - metrics["trojan/acc"]
    if poisoned_test is not None:
        sources = data.test.images[attack.test_sources(data.test)]
        metrics.update(stealthiness(sources, poisoned_test.images, experiment.device))
        nsr = NSRSettings.from_config(experiment.cfg)
        metrics["clean/nsr"] = nsr.measure(clean_model, sources, poisoned_test.images)
        metrics["trojan/nsr"] = nsr.measure(trojan_model, sources, poisoned_test.images)
        metrics.update(attack.report(data.test, poisoned_test, experiment.device))
    experiment.timings["evaluate_s"] = time.perf_counter() - started

    keys = {"clean": resources.clean_key(), "trojan": resources.trojan_key()}
    context = RunContext(experiment.cfg, data, attack, clean_model, trojan_model, poisoned_train, poisoned_test,
                         output_dir, experiment.device, resources.retrain, undefended, loggers=loggers,
                         cache=resources.cache, model_keys=keys, recipe=experiment.recipe)
    started = time.perf_counter()
    metrics.update(experiment.defense.run(context))
    experiment.timings["defense_s"] = time.perf_counter() - started
    for analysis in experiment.analyses:
        started = time.perf_counter()
        metrics.update(analysis.run(context))
        experiment.timings[f"analysis_{analysis.name}_s"] = time.perf_counter() - started
    return {"metrics": metrics, "artifacts": resources.artifacts, "poisoned_train": poisoned_train,
            "poisoned_test": poisoned_test}


def tensor_digest(images: ImageSet) -> str:
    """A content hash of a training set, so a model retrained on it is cached by what it saw."""
    return spec_hash({"images": hashlib.sha256(images.images.numpy().tobytes()).hexdigest(),
                      "labels": hashlib.sha256(images.labels.numpy().tobytes()).hexdigest()})
