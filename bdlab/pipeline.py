"""One run, end to end: data -> attack -> clean and trojaned models -> defense -> metrics.

Every input is validated before anything is trained or written (``ConfigError``); models
come from the artifact cache when an identical config built them before.
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
from bdlab.cache import ArtifactCache, spec_hash
from bdlab.context import RunContext
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.defenses.base import Defense
from bdlab.errors import build
from bdlab.evaluate import predict_logits
from bdlab.metrics import accuracy, attack_success_rate, target_confidence, true_class_confidence
from bdlab.models.classifier import Classifier, build_classifier
from bdlab.training.augment import TrainAugment
from bdlab.training.fit import fit_classifier

log = logging.getLogger(__name__)

# config keys that say where things live, not what they are: never part of a cache key
_LOCATION_KEYS = ("root", "download", "system_dir", "cache_dir")


def _without_locations(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in _LOCATION_KEYS}


@dataclass
class Experiment:
    """The validated objects of one run, built from its config before any training."""

    cfg: DictConfig
    data: DatasetSplits
    attack: Attack
    defense: Defense
    analyses: list[Analysis]
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)

    def new_model(self, seed: int | None = None) -> Classifier:
        """A freshly initialised classifier; seeded (by the run's seed unless ``seed`` is given) so the
        clean and trojaned models start identical."""
        pl.seed_everything(int(self.cfg.seed) if seed is None else seed, verbose=False)
        return build_classifier(build(self.cfg.model.net), self.data.input_shape, self.data.num_classes,
                                self.data.mean, self.data.std)


def resolve_device(trainer_cfg: DictConfig) -> torch.device:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def prepare(cfg: DictConfig) -> Experiment:
    """Load the data and instantiate attack and defense; raises ConfigError on any invalid value."""
    started = time.perf_counter()
    data: DatasetSplits = build(cfg.dataset).load()
    load_time = time.perf_counter() - started
    attack: Attack = build(cfg.attack)
    attack.setup(data)
    defense: Defense = build(cfg.defense)
    defense.setup(data, attack)
    analyses: list[Analysis] = [build(node) for node in (cfg.get("analysis") or {}).values()]
    for analysis in analyses:
        analysis.setup(data, attack)
    experiment = Experiment(cfg, data, attack, defense, analyses, resolve_device(cfg.trainer))
    experiment.new_model()  # checks that the model accepts the dataset's input
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


def trained_model(experiment: Experiment, cache: ArtifactCache, kind: str, spec: dict[str, Any],
                  train: ImageSet, loggers: list[Logger], attack: Attack | None = None) -> tuple[Classifier, bool]:
    """The model for ``spec`` from the cache, or trained on ``train`` and stored.

    ``attack`` (for trojaned models) may change training through its ``train_transform``,
    applied after the dataset's augmentation. The model is initialised and trained with
    ``spec["seed"]``.
    """
    seed = int(spec["seed"])
    model = experiment.new_model(seed)
    augment = TrainAugment(experiment.data.crop_padding, experiment.data.hflip)
    transform = augment if attack is None else (lambda x: attack.train_transform(augment(x)))

    def train_state() -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        fit_classifier(model, train, experiment.cfg, train_transform=transform, loggers=loggers, name=kind, seed=seed)
        experiment.timings[f"{kind}_train_s"] = time.perf_counter() - started
        return model.state_dict()

    state, reused = cache.get_or_build(f"models/{kind}", spec, train_state)
    if reused:
        model.load_state_dict(state)
    return model.to(experiment.device).eval(), reused


def attack_metrics(model: Classifier, data: DatasetSplits, attack: Attack,
                   poisoned_test: ImageSet | None, prefix: str) -> dict[str, float]:
    clean_logits = predict_logits(model, data.test.images)
    metrics = {f"{prefix}/acc": accuracy(clean_logits, data.test.labels),
               f"{prefix}/ccc": true_class_confidence(clean_logits, data.test.labels)}
    if poisoned_test is not None:
        poisoned_logits = predict_logits(model, poisoned_test.images)
        metrics[f"{prefix}/asr"] = attack_success_rate(poisoned_logits, attack.target_class)
        metrics[f"{prefix}/tmc"] = target_confidence(poisoned_logits, attack.target_class)
    return metrics


@dataclass
class OtherSeedCleanModels:
    """The clean models of the run's data and recipe trained with other seeds
    (:class:`~bdlab.attacks.base.CleanModels`), cached like the reference model."""

    experiment: Experiment
    cache: ArtifactCache
    loggers: list[Logger]

    def spec(self, seed: int) -> dict[str, Any]:
        return {**model_spec(self.experiment.cfg, with_attack=False), "seed": int(seed)}

    def key(self, seed: int) -> str:
        return spec_hash(self.spec(seed))

    def model(self, seed: int) -> Classifier:
        return trained_model(self.experiment, self.cache, "clean", self.spec(seed), self.experiment.data.train,
                             self.loggers)[0]


def hand_clean_model(experiment: Experiment, cache: ArtifactCache, clean_model: Classifier,
                     clean_spec: dict[str, Any], loggers: list[Logger]) -> None:
    """Give the attack the clean reference model, its key and the clean models of other seeds."""
    experiment.attack.use_clean_model(clean_model, cache, spec_hash(clean_spec),
                                      OtherSeedCleanModels(experiment, cache, loggers))


def poisoned_training_set(experiment: Experiment, cache_dir: str | Path) -> PoisonedSet:
    """The training set the attacker hands over, outside a full run (export, benchmarks).

    Attacks that craft their poisons on a clean surrogate first get the clean reference model,
    from the cache or trained, exactly as :func:`execute` hands it to them.
    """
    if experiment.attack.needs_clean_model:
        cache = ArtifactCache(cache_dir)
        clean_spec = model_spec(experiment.cfg, with_attack=False)
        clean_model, _ = trained_model(experiment, cache, "clean", clean_spec, experiment.data.train, [])
        hand_clean_model(experiment, cache, clean_model, clean_spec, [])
    return experiment.attack.poison_train(experiment.data.train, experiment.device)


def execute(experiment: Experiment, cache_dir: str | Path, output_dir: Path,
            loggers: list[Logger]) -> dict[str, Any]:
    """Train (or reuse) both models, evaluate, defend; returns the metrics, the artifact records and the
    poisoned training set (None without an attack)."""
    cfg, data, attack = experiment.cfg, experiment.data, experiment.attack
    cache = ArtifactCache(cache_dir)
    clean_spec = model_spec(cfg, with_attack=False)
    clean_model, clean_reused = trained_model(experiment, cache, "clean", clean_spec, data.train, loggers)
    artifacts = {"clean_model": {"path": str(cache.path("models/clean", clean_spec)), "reused": clean_reused}}

    poisoned_train: PoisonedSet | None = None
    poisoned_test: ImageSet | None = None
    if isinstance(attack, NoAttack):
        trojan_model = clean_model
    else:
        started = time.perf_counter()
        hand_clean_model(experiment, cache, clean_model, clean_spec, loggers)
        poisoned_train = attack.poison_train(data.train, experiment.device)
        poisoned_test = attack.poison_test(data.test, experiment.device)
        experiment.timings["poison_s"] = time.perf_counter() - started
        trojan_spec = model_spec(cfg, with_attack=True)
        trojan_model, trojan_reused = trained_model(experiment, cache, "trojan", trojan_spec, poisoned_train, loggers,
                                                    attack)
        artifacts["trojan_model"] = {"path": str(cache.path("models/trojan", trojan_spec)), "reused": trojan_reused}

    started = time.perf_counter()
    metrics = attack_metrics(clean_model, data, attack, None, "clean")
    metrics.update(attack_metrics(trojan_model, data, attack, poisoned_test, "trojan"))
    metrics["attack/cad"] = metrics["clean/acc"] - metrics["trojan/acc"]
    experiment.timings["evaluate_s"] = time.perf_counter() - started

    def retrain(train: ImageSet, tag: str) -> Classifier:
        spec = {**clean_spec, "retrain": tag, "train_content": tensor_digest(train)}
        model, reused = trained_model(experiment, cache, "retrained", spec, train, loggers)
        artifacts[f"retrained_{tag}"] = {"path": str(cache.path("models/retrained", spec)), "reused": reused}
        return model

    context = RunContext(cfg, data, attack, clean_model, trojan_model, poisoned_train, poisoned_test, output_dir,
                         experiment.device, retrain, baseline=dict(metrics), loggers=loggers)
    started = time.perf_counter()
    metrics.update(experiment.defense.run(context))
    experiment.timings["defense_s"] = time.perf_counter() - started
    for analysis in experiment.analyses:
        started = time.perf_counter()
        metrics.update(analysis.run(context))
        experiment.timings[f"analysis_{analysis.name}_s"] = time.perf_counter() - started
    return {"metrics": metrics, "artifacts": artifacts, "poisoned_train": poisoned_train}


def tensor_digest(images: ImageSet) -> str:
    """A content hash of a training set, so a model retrained on it is cached by what it saw."""
    return spec_hash({"images": hashlib.sha256(images.images.numpy().tobytes()).hexdigest(),
                      "labels": hashlib.sha256(images.labels.numpy().tobytes()).hexdigest()})
