"""bdlab from Python: plain tensors and ``nn.Module``s in, ``results.json``'s metric keys out.

Every call composes the same config ``python -m bdlab.run`` would (defaults from the same YAML files, the same
validation, one line per bad field) and runs the same code: :func:`bdlab.pipeline.prepare`, the run
services, the one evaluator and the defenses' own ``run``. A model trained here is the model the command
line trains for the same settings, to the last digit, and both share the artifact cache. ::

    import bdlab
    data = bdlab.load_data("mnist")                       # or bdlab.from_tensors(x_train, y_train, x_test, y_test)
    attack = bdlab.attack("badnets", target_class=0)
    poisoned = attack.poison(data)                        # poisoned.train: images, labels, is_poison
    model = bdlab.train(poisoned, "lenet", max_epochs=2)  # a Classifier (an nn.Module on float [0, 1] images)
    bdlab.measure(model, data, attack)                    # {"trojan/acc": ..., "trojan/asr": ..., ...}
    bdlab.defense("neural_cleanse").run(model, data)      # {"defense/flagged_classes": [...], ...}
    bdlab.defense("strip").scores(model, inputs, data)    # one suspicion score per input

Reference: docs/api.md.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import save_file
from torch import Tensor, nn

from bdlab.attacks.base import Attack, PoisonedSet
from bdlab.attacks.given import GivenModel
from bdlab.cache import content_digest
from bdlab.compose import compose_config
from bdlab.console import quiet_third_party
from bdlab.datasets.base import DatasetSplits, ImageSet, to_uint8
from bdlab.defenses.base import Defense
from bdlab.errors import ConfigError, build, check_config
from bdlab.evaluate import evaluate, evaluate_attack
from bdlab.models.classifier import Classifier
from bdlab.nsr import NSRSettings
from bdlab.pipeline import Experiment, poisoned_training_set, prepare
from bdlab.services import RunServices

__all__ = ["AttackSpec", "Data", "DefenseSpec", "Poisoned", "attack", "defense", "from_tensors", "load_data",
           "measure", "train"]


def _config(overrides: Sequence[str], **nodes: dict[str, Any] | None) -> DictConfig:
    """The run config of ``overrides`` with each group's ``fields`` merged in (``attack={"target_class": 3}``),
    checked as the command line checks it."""
    quiet_third_party()
    cfg = compose_config(["logger=none", *overrides])
    with open_dict(cfg):
        for group, fields in nodes.items():
            if fields:
                cfg[group] = OmegaConf.merge(cfg[group], fields)
    check_config(cfg)
    return cfg


@dataclass(frozen=True)
class Data:
    """A dataset as a run sees it: the splits (``train``, ``defense``: held-out clean, ``test``) and the
    dataset option that loads them (``dataset=mnist``, or ``dataset=tensors`` for :func:`from_tensors`)."""

    splits: DatasetSplits
    overrides: tuple[str, ...]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> ImageSet:
        return self.splits.train

    @property
    def test(self) -> ImageSet:
        return self.splits.test

    @property
    def defense(self) -> ImageSet:
        return self.splits.defense

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes


def load_data(name: str = "mnist", **fields: Any) -> Data:
    """The dataset option ``dataset=<name>`` with its fields changed (``load_data("synthetic", size=16)``)."""
    cfg = _config([f"dataset={name}"], dataset=fields)
    return Data(build(cfg.dataset).load(), (f"dataset={name}",), dict(fields))


def _as_uint8(images: Tensor, name: str) -> Tensor:
    if images.dim() != 4:
        raise ConfigError(name, f"got shape {tuple(images.shape)}, must be (N, C, H, W)")
    return images if images.dtype == torch.uint8 else to_uint8(images.float())


def from_tensors(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                 class_names: Sequence[str] | None = None, cache_dir: str | Path | None = None,
                 **fields: Any) -> Data:
    """Your own images as a dataset: ``(N, C, H, W)`` uint8, or float in ``[0, 1]``, with int labels. They are
    written once, keyed by their content, as the safetensors file ``dataset=tensors`` reads, and loaded by that
    option (so models trained on them are cached by their content). ``fields`` are the option's
    (``defense_fraction``, ``split_seed``, ...)."""
    tensors = {"images": _as_uint8(x_train, "x_train"), "labels": y_train.long(),
               "test_images": _as_uint8(x_test, "x_test"), "test_labels": y_test.long()}
    root = Path(cache_dir or _config([]).cache_dir).expanduser() / "api" / "tensors"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{content_digest(*tensors.values(), list(class_names or []))[:20]}.safetensors"
    if not path.is_file():  # written whole, then renamed: a reader never sees half a file
        with tempfile.NamedTemporaryFile(dir=root, suffix=".tmp", delete=False) as handle:
            save_file({k: v.contiguous() for k, v in tensors.items()}, handle.name,
                      metadata={"class_names": ",".join(class_names)} if class_names else None)
        Path(handle.name).replace(path)
    return load_data("tensors", path=str(path), **fields)


class AttackSpec:
    """An attack option with its fields (``bdlab.attack("badnets", target_class=0)``), validated on creation.

    ``instance`` is the :class:`~bdlab.attacks.base.Attack` last set up on data (by :meth:`poison` or
    :func:`train`, which leaves in it what the attack learned while training)."""

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name, self.fields = name, dict(fields)
        build(_config([f"attack={name}"], attack=self.fields).attack)  # names and types, one line each
        self.instance: Attack | None = None

    def poison(self, data: Data) -> Poisoned:
        """The attack set up on ``data``; its poisoned training set is built when first asked for."""
        experiment = prepare(_config([*data.overrides, f"attack={self.name}"], dataset=data.fields,
                                     attack=self.fields))
        self.instance = experiment.attack
        return Poisoned(data, self, experiment)

    def __repr__(self) -> str:
        return f"bdlab.attack({self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.fields.items())})"


@dataclass
class Poisoned:
    """A dataset with an attack set up on it: what :func:`train` trains a trojaned model on."""

    data: Data
    attack: AttackSpec
    experiment: Experiment

    @property
    def train(self) -> PoisonedSet:
        """The poisoned training set the attacker hands over (images, relabelled labels, ``is_poison``); an
        attack that learns its trigger trains the trojaned model first, as the command line does."""
        return poisoned_training_set(self.experiment)


def attack(name: str, **fields: Any) -> AttackSpec:
    """The attack option ``attack=<name>`` with its fields changed; raises ConfigError on a bad field."""
    return AttackSpec(name, fields)


def train(source: Data | Poisoned, model: str = "lenet", seed: int = 0, model_fields: dict[str, Any] | None = None,
          **trainer: Any) -> Classifier:
    """A model trained as ``python -m bdlab.run`` trains it: on clean ``Data`` the clean reference, on
    ``Poisoned`` data the trojaned model (the attack's own training module, hooks and learned state); from
    the artifact cache when the same settings trained it before. ``trainer`` are the trainer group's fields
    (``max_epochs=2``), ``model_fields`` the model option's (``lr``, ``weights``, ``net``: {...})."""
    poisoned = isinstance(source, Poisoned)
    data = source.data if poisoned else source
    overrides = [*data.overrides, f"model={model}", f"seed={seed}",
                 f"attack={source.attack.name}" if poisoned else "attack=none"]
    experiment = prepare(_config(overrides, dataset=data.fields, attack=source.attack.fields if poisoned else None,
                                 model=model_fields, trainer=trainer))
    if poisoned:
        source.attack.instance = experiment.attack
        return experiment.services.trojan_model()
    return experiment.services.clean_model()


def _classifier(model: nn.Module, data: Data) -> Classifier:
    """``model`` as bdlab runs it: a Classifier as is; a plain module gets float images in ``[0, 1]``."""
    if isinstance(model, Classifier):
        return model
    return Classifier(model, (0.0,) * data.splits.channels, (1.0,) * data.splits.channels).eval()


def _subject(model: nn.Module, data: Data, attack: AttackSpec | None, clean: nn.Module | None,
             defense: str = "none", defense_fields: dict[str, Any] | None = None) -> tuple[RunServices, Defense]:
    """Run services around a given model (and clean reference), with the attack's trigger when one is given
    (set up on ``data`` unless :func:`train` set it up), and the defense built and validated against them."""
    subject = _classifier(model, data)
    cfg = _config([*data.overrides, "attack=given", f"defense={defense}"], dataset=data.fields,
                  defense=defense_fields)
    if attack is not None and (attack.instance is None or not attack.instance.is_set_up):
        attack.poison(data)
    given: GivenModel = GivenModel.around(attack.instance) if attack is not None else build(cfg.attack)
    services = RunServices(cfg, data.splits, attack=given, network=lambda **_: copy.deepcopy(subject.net))
    services.mean, services.std = tuple(subject.mean.flatten().tolist()), tuple(subject.std.flatten().tolist())
    given.setup(data.splits, services)
    services.use_models(trojan=subject, clean=_classifier(clean, data) if clean is not None else None)
    built: Defense = build(cfg.defense)
    built.setup(data.splits, given)
    built.check_model(services.new_model())
    if given.has_poisoned_test:
        services.poisoned_test = given.poison_test(data.test, services.device)
    return services, built


def measure(model: nn.Module, data: Data, attack: AttackSpec | None = None,
            clean: nn.Module | None = None) -> dict[str, float]:
    """The run's attack-level metrics of ``model`` (results.json's keys): ``trojan/acc`` and with the attack's
    trigger ``trojan/asr``, TMC, stealthiness and NSR; with a clean reference ``clean/...`` and
    ``attack/cad``. What was not given is NaN (not applicable)."""
    services, _ = _subject(model, data, attack, clean)
    metrics, _ = evaluate_attack(services.clean_model() if clean is not None else None, services.trojan_model(),
                                 services, NSRSettings.from_config(services.cfg))
    return metrics


class DefenseSpec:
    """A defense option with its fields (``bdlab.defense("strip", fpr=0.01)``), validated on creation."""

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name, self.fields = name, dict(fields)
        self.category = type(build(_config([f"defense={name}"], defense=self.fields).defense)).category

    def run(self, model: nn.Module, data: Data, attack: AttackSpec | None = None,
            clean: nn.Module | None = None, output_dir: str | Path = ".") -> dict[str, Any]:
        """The defense on ``model`` as a run applies it: results.json's ``defense/...`` keys (the attack's, for
        ASR and the target's figures, when given; a clean reference for the clean model's figures)."""
        services, built = self._services(model, data, attack, clean, output_dir)
        return built.run(services)

    def scores(self, model: nn.Module, inputs: Tensor, data: Data) -> Tensor:
        """One suspicion score per input (higher: more suspicious), for input-filtering defenses; ``data``
        supplies the held-out clean images the method compares against. ``inputs`` are uint8 or float in
        ``[0, 1]``, ``(N, C, H, W)``."""
        services, built = self._services(model, data, None, None, ".")
        if not hasattr(built, "scores"):
            raise ConfigError("defense", f"{self.name} is a {self.category.replace('_', ' ')} defense and scores no "
                              "inputs; use .run(model, data)")
        return built.scores(services, _as_uint8(inputs, "inputs"))

    def _services(self, model: nn.Module, data: Data, attack: AttackSpec | None, clean: nn.Module | None,
                  output_dir: str | Path) -> tuple[RunServices, Defense]:
        services, built = _subject(model, data, attack, clean, self.name, self.fields)
        services.output_dir = Path(output_dir)
        services.undefended = evaluate(services.trojan_model(), data.test, services.poisoned_test,
                                       services.attack.target_class)
        return services, built

    def __repr__(self) -> str:
        return f"bdlab.defense({self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.fields.items())})"


def defense(name: str, **fields: Any) -> DefenseSpec:
    """The defense option ``defense=<name>`` with its fields changed; raises ConfigError on a bad field."""
    return DefenseSpec(name, fields)

