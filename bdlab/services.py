"""What a run provides to its attack, defense and analyses: one services object.

:class:`RunServices` is handed to :meth:`Attack.setup` and to :meth:`Defense.run` alike. It holds the
run's data, recipe, device and artifact cache, and gives:

- ``cached(kind, spec, build)``: an artifact from the cache, or built, stored, and returned with the
  seconds its build took (as measured when it was built, also on a cache hit);
- ``fit_helper(module, seed)``: trains a helper network (an encoder, autoencoder, generator) through
  Lightning with the run's trainer settings under its own random generator, so the run's global
  random state is the same afterwards as before;
- the models: ``clean_model(seed)`` (the clean reference, or one of another seed), ``trojan_model()``,
  their cache keys, ``fresh_model()`` and ``retrain(train, tag)``, each from the cache or trained on
  first use with the run's recipe;
- once the pipeline has trained the models, the subject a defense works on: ``attack``,
  ``poisoned_train``, ``poisoned_test`` (which carries its source indices) and ``undefended``.

Build one from Python with :func:`create` (the same config ``python -m bdlab.run`` composes).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from bdlab.cache import ArtifactCache, Tensors, content_digest, spec_hash
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.errors import ConfigError, build
from bdlab.models.classifier import Classifier, build_classifier
from bdlab.models.weights import load_weights, read_state_dict
from bdlab.training.augment import TrainAugment
from bdlab.training.fit import fit, fit_classifier, training_batches
from bdlab.training.recipe import TrainingRecipe

if TYPE_CHECKING:
    from bdlab.attacks.base import Attack, PoisonedSet
    from bdlab.evaluate import Evaluation

log = logging.getLogger(__name__)

# config keys that say where things live, not what they are: never part of a cache key
_LOCATION_KEYS = ("root", "download", "system_dir", "cache_dir", "path")
MODEL_PREFIX, ATTACK_PREFIX = "model/", "attack/"
SECONDS = "_build_seconds"


def _without_locations(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in _LOCATION_KEYS}


def training_processes(trainer: dict[str, Any]) -> int:
    """How many processes train one model: ``devices`` (a count or a list) x ``num_nodes`` under DDP, else 1."""
    if "ddp" not in str(trainer.get("strategy", "auto")):
        return 1
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1
    return count * int(trainer.get("num_nodes", 1))


def model_options(cfg: DictConfig) -> dict[str, Any]:
    """The model node, with a given weights file named by its content's digest, not its path."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("weights"):
        model["weights"] = weights_digest(str(model["weights"]))
    return model


@functools.lru_cache(maxsize=8)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    state = read_state_dict(path)
    return content_digest(*(part for key in sorted(state) for part in (key, state[key])))


def weights_digest(path: str) -> str:
    """The digest of a weights file's content, its names and tensors (so the same weights saved as
    safetensors or with torch.save share every cache entry derived from them); read once per file version."""
    file = Path(path).expanduser()
    stat = file.stat()
    return _digest_of(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def attack_spec(node: DictConfig) -> dict[str, Any]:
    """The attack's config as its models' cache keys hold it: no locations, and no field added later at its
    default (:meth:`bdlab.attacks.base.Attack.cache_fields`), so models cached before keep their keys."""
    fields = _without_locations(node)
    try:
        attack_class = get_class(str(fields.get("_target_")))
    except Exception:  # an unimportable target is refused, in one line, where the attack is built
        return fields
    cache_fields = getattr(attack_class, "cache_fields", None)
    return cache_fields(fields) if cache_fields is not None else fields


def model_spec(cfg: DictConfig, with_attack: bool, fingerprint: str | None = None) -> dict[str, Any]:
    """Exactly the config that determines a trained model (never the defense, logger or paths); ``fingerprint``
    is the dataset's (:attr:`DatasetSplits.fingerprint`), for own data whose files its config only locates."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    recipe = {"max_epochs": trainer.get("max_epochs"), "precision": trainer.get("precision")}
    processes = training_processes(trainer)
    if processes > 1:  # DDP: each step sees processes x batch_size images, so the model differs
        recipe["processes"] = processes
    return {
        "dataset": {**_without_locations(cfg.dataset), **({"content": fingerprint} if fingerprint else {})},
        "model": model_options(cfg),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        "recipe": recipe,
        "attack": attack_spec(cfg.attack) if with_attack else None,
        "seed": int(cfg.seed),
    }


def unprefixed(tensors: Tensors, prefix: str) -> Tensors:
    """The entries of one part of a cache entry (``model/``, ``attack/``) under their own names."""
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def same_keys(model: torch.nn.Module) -> Callable[[Tensors], bool]:
    """A cache-entry check: the entry holds exactly ``model``'s state-dict keys."""
    expected = set(model.state_dict())
    return lambda tensors: set(tensors) == expected


def normalisation(model_cfg: Any, data: DatasetSplits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``model.mean`` and ``model.std`` (one value per channel), or the dataset's statistics where null."""
    stats = []
    for name, default in (("mean", data.mean), ("std", data.std)):
        given = model_cfg.get(name) if hasattr(model_cfg, "get") else None
        if given is None:
            stats.append(tuple(default))
            continue
        values = tuple(float(v) for v in (given if isinstance(given, (list, tuple, ListConfig)) else [given]))
        if len(values) != data.channels:
            raise ConfigError(f"model.{name}", f"got {len(values)} value(s) for {data.channels}-channel images; "
                              f"give {data.channels} (or null for the dataset's own)")
        if name == "std" and min(values) <= 0:
            raise ConfigError("model.std", f"got {list(values)}, every value must be > 0")
        stats.append(values)
    return stats[0], stats[1]


def resolve_device(trainer_cfg: DictConfig) -> torch.device:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class RunServices:
    """The run's data, recipe, device and cache, its models, and the subject defenses work on.

    Args:
        cfg: the composed run config (dataset, model, attack, trainer, seed); None for services around
            given models only (:meth:`use_models`), which then train nothing.
        data: the loaded dataset splits.
        recipe: the validated training recipe (from ``cfg`` when omitted).
        attack: the run's attack (the pipeline sets it; :class:`~bdlab.attacks.base.NoAttack` by default).
        cache: the artifact cache (``cfg.cache_dir`` when omitted).
        device: where models run (from the trainer's accelerator when omitted).
        output_dir: where defenses and analyses write files (CSV, PNG).
        network: the victim's backbone class or factory, called with ``in_channels``, ``num_classes`` and
            ``input_size`` (default: the config's ``model.net``).
    """

    def __init__(self, cfg: DictConfig | None, data: DatasetSplits, recipe: TrainingRecipe | None = None,
                 attack: Attack | None = None, cache: ArtifactCache | None = None,
                 device: torch.device | None = None, output_dir: str | Path = ".",
                 network: Callable[..., torch.nn.Module] | None = None) -> None:
        from bdlab.attacks.base import NoAttack

        self.cfg, self.data = cfg, data
        self.recipe = recipe if recipe is not None or cfg is None else TrainingRecipe.from_config(cfg)
        self.attack: Attack = attack if attack is not None else NoAttack()
        self.cache = cache if cache is not None else ArtifactCache(cfg.cache_dir if cfg is not None else output_dir)
        self.device = device if device is not None else \
            resolve_device(cfg.trainer) if cfg is not None else torch.device("cpu")
        self.output_dir = Path(output_dir)
        self.network = network
        self.loggers: list[Logger] = []
        #: every model handed out, for results.json: path and whether it came from the cache
        self.artifacts: dict[str, dict[str, Any]] = {}
        #: seconds of each stage (``clean_train_s``, ``trojan_train_s``, ...), for results.json
        self.timings: dict[str, float] = {}
        self.poisoned_train: PoisonedSet | None = None
        self.poisoned_test: ImageSet | None = None
        self.undefended: Evaluation | None = None
        self._clean: dict[int, Classifier] = {}
        self._trojan: Classifier | None = None
        self._given: dict[str, str] = {}
        model_cfg = cfg.model if cfg is not None else {}
        self.mean, self.std = normalisation(model_cfg, data)
        #: ``model.weights``: every model the run builds starts from them (a given model is them)
        self.weights = read_state_dict(model_cfg["weights"]) if model_cfg.get("weights") else None

    @property
    def seed(self) -> int:
        """The run's seed (0 without a recipe)."""
        return self.recipe.seed if self.recipe is not None else 0

    # ---- artifacts
    def cached(self, kind: str, spec: dict[str, Any], build_tensors: Callable[[], Tensors],
               validate: Callable[[Tensors], bool] | None = None) -> tuple[Tensors, float]:
        """The artifact ``kind`` for ``spec``: from the cache, or built now and stored; returned with the
        seconds its build took (measured when it was built, also on a cache hit)."""
        def timed() -> Tensors:
            started = time.perf_counter()
            tensors = build_tensors()
            return {**tensors, SECONDS: torch.tensor(time.perf_counter() - started, dtype=torch.float64)}

        def complete(tensors: Tensors) -> bool:
            return SECONDS in tensors and (validate is None or validate(
                {k: v for k, v in tensors.items() if k != SECONDS}))

        tensors, _ = self.cache.get_or_build(kind, spec, timed, complete)
        seconds = float(tensors.pop(SECONDS))
        return tensors, seconds

    @staticmethod
    def digest(*parts: Any) -> str:
        """The content digest of tensors, image sets or JSON-able values (:func:`bdlab.cache.content_digest`)."""
        return content_digest(*parts)

    # ---- training
    def new_model(self, seed: int | None = None) -> Classifier:
        """A freshly initialised classifier; seeded (by the run's seed unless ``seed`` is given) so the
        clean and trojaned models start identical."""
        pl.seed_everything(self.recipe.seed if seed is None else seed, verbose=False)
        network = self.network if self.network is not None else build(self.cfg.model.net)
        model = build_classifier(network, self.data.input_shape, self.data.num_classes, self.mean, self.std)
        if self.weights is not None:
            load_weights(model.net, self.weights)
        return model

    def fresh_model(self) -> Classifier:
        """A freshly initialised classifier of the run's architecture (to check layer names; trains nothing)."""
        return self.new_model()

    def augment(self) -> TrainAugment:
        return TrainAugment(self.data.crop_padding, self.data.hflip)

    def fit_helper(self, module: pl.LightningModule, seed: int, description: str = "helper network",
                   **trainer_overrides: Any) -> None:
        """Train a helper network's LightningModule with the run's trainer settings (``trainer_overrides``
        replace some, e.g. ``max_epochs``) under its own generator seeded by ``seed``: the run's global
        random state is restored afterwards, so a helper trained or read from the cache changes nothing
        downstream."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            trainer = self.recipe.make_trainer(False, **trainer_overrides)
            log.info("training the %s for %d epochs", description, trainer.max_epochs)
            trainer.fit(module)

    # ---- models
    def use_models(self, clean: Classifier | None = None, trojan: Classifier | None = None,
                   others: dict[int, Classifier] | None = None) -> RunServices:
        """Take these models instead of training them: the clean reference, the trojaned model and clean
        models of other seeds (a user's own models, tests). Their cache keys are digests of their weights."""
        for seed, model in {**(others or {}), **({self.seed: clean} if clean is not None else {})}.items():
            self._clean[int(seed)] = model
            self._given[f"clean/{int(seed)}"] = content_digest(*model.state_dict().values())
        if trojan is not None:
            self._trojan = trojan
            self._given["trojan"] = content_digest(*trojan.state_dict().values())
        return self

    def clean_spec(self, seed: int | None = None) -> dict[str, Any]:
        spec = model_spec(self.cfg, with_attack=False, fingerprint=self.data.fingerprint)
        return spec if seed is None else {**spec, "seed": int(seed)}

    def clean_key(self, seed: int | None = None) -> str:
        """The cache key of the clean model of ``seed`` (default: the run's); loads nothing it need not."""
        if not self.attack.trains:
            self.clean_model(seed)
        given = self._given.get(f"clean/{self.seed if seed is None else int(seed)}")
        return given if given is not None else spec_hash(self.clean_spec(seed))

    def has_clean_reference(self) -> bool:
        """Whether a clean reference model exists: trained by the run, or given (a given model's run has one
        only with ``attack.clean_weights``); without one, clean-model figures are not applicable."""
        return self.attack.trains or self.seed in self._clean or bool(getattr(self.attack, "clean_weights", None))

    def given_clean_model(self, seed: int) -> Classifier:
        """The clean reference a given model's run was given (``attack.clean_weights``)."""
        path = getattr(self.attack, "clean_weights", None)
        if seed != self.seed or not path:
            raise ConfigError("attack.clean_weights", "this needs a clean reference model and a given model's run "
                              "trains none: give attack.clean_weights=PATH (same architecture)")
        model = self.new_model()
        load_weights(model.net, read_state_dict(path, "attack.clean_weights"), "attack.clean_weights")
        self._given[f"clean/{seed}"] = weights_digest(path)
        return model.to(self.device).eval()

    def clean_model(self, seed: int | None = None) -> Classifier:
        """The clean model of ``seed`` (default: the run's reference model), in eval mode on the device."""
        seed = self.seed if seed is None else int(seed)
        if seed not in self._clean and not self.attack.trains:
            self._clean[seed] = self.given_clean_model(seed)
        if seed not in self._clean:
            spec = self.clean_spec(seed)
            model, reused = self.trained_model("clean", spec, self.data.train)
            if seed == self.recipe.seed:
                self.artifacts["clean_model"] = {"path": str(self.cache.path("models/clean", spec)), "reused": reused}
            self._clean[seed] = model
        return self._clean[seed]

    def trained_model(self, kind: str, spec: dict[str, Any], train: ImageSet) -> tuple[Classifier, bool]:
        """The model for ``spec`` from the cache, or trained on ``train`` with the victim module and stored."""
        seed = int(spec["seed"])
        model = self.new_model(seed)

        def train_state() -> Tensors:
            started = time.perf_counter()
            fit_classifier(model, train, self.recipe, self.augment(), loggers=self.loggers, name=kind, seed=seed)
            self.timings[f"{kind}_train_s"] = time.perf_counter() - started
            return model.state_dict()

        state, reused = self.cache.get_or_build(f"models/{kind}", spec, train_state, same_keys(model))
        if reused:
            model.load_state_dict(state)
        return model.to(self.device).eval(), reused

    def retrain(self, train: ImageSet, tag: str) -> Classifier:
        """A fresh model trained with the run's recipe on ``train`` (a filtered training set), cached by content."""
        spec = {**self.clean_spec(), "retrain": tag, "train_content": content_digest(train)}
        model, reused = self.trained_model("retrained", spec, train)
        self.artifacts[f"retrained_{tag}"] = {"path": str(self.cache.path("models/retrained", spec)), "reused": reused}
        return model

    def has_attack(self) -> bool:
        from bdlab.attacks.base import NoAttack

        return not isinstance(self.attack, NoAttack)

    def trojan_key(self) -> str:
        """The trojaned model's cache key (the clean model's without an attack)."""
        if not self.has_attack():
            return self.clean_key()
        if not self.attack.trains:
            self.trojan_model()
        return self._given.get("trojan") or \
            spec_hash(model_spec(self.cfg, with_attack=True, fingerprint=self.data.fingerprint))

    def trojan_model(self) -> Classifier:
        """The trojaned model with its attack's learned state restored: from the cache, or trained (the
        clean reference without an attack)."""
        if not self.has_attack() and self._trojan is None:
            return self.clean_model()
        if self._trojan is None and not self.attack.trains:
            if self.weights is None:
                raise ConfigError("model.weights", "attack=given scans a model you give: set model.weights=PATH "
                                  "(a .safetensors file or a torch.save'd state dict)")
            self._trojan = self.new_model().to(self.device).eval()
            self._given["trojan"] = weights_digest(str(self.cfg.model.weights))
            self.artifacts["trojan_model"] = {"path": str(self.cfg.model.weights), "reused": True}
        if self._trojan is None:
            attack = self.attack
            spec = model_spec(self.cfg, with_attack=True, fingerprint=self.data.fingerprint)
            model = attack.model_shell(self.new_model())
            expected = {MODEL_PREFIX + k for k in model.state_dict()} | {ATTACK_PREFIX + k for k in attack.state_dict()}

            def train_state() -> Tensors:
                trained = self.train_trojan()
                return {**{MODEL_PREFIX + k: v for k, v in trained.state_dict().items()},
                        **{ATTACK_PREFIX + k: v for k, v in attack.state_dict().items()}}

            tensors, reused = self.cache.get_or_build("models/trojan", spec, train_state,
                                                      lambda found: set(found) == expected)
            model.load_state_dict(unprefixed(tensors, MODEL_PREFIX))
            attack.load_state_dict(unprefixed(tensors, ATTACK_PREFIX))
            self.artifacts["trojan_model"] = {"path": str(self.cache.path("models/trojan", spec)), "reused": reused}
            self._trojan = model.to(self.device).eval()
        return self._trojan

    def trojan_training(self) -> tuple[Classifier, pl.LightningModule, PoisonedSet]:
        """The attack's starting model, its training module and the training set it gets (poisoning,
        and any trigger the attack learns before training, happen here)."""
        attack, recipe = self.attack, self.recipe
        model = attack.initial_model(self.new_model())
        train_set = attack.training_set(self.data.train, self.device)
        module = attack.training_module(model, training_batches(train_set, recipe, recipe.seed), recipe,
                                        self.augment(), "trojan")
        return model, module, train_set

    def train_trojan(self) -> Classifier:
        """Train the trojaned model with the attack's LightningModule (timings: ``poison_s``, ``trojan_train_s``)."""
        started = time.perf_counter()
        model, module, train_set = self.trojan_training()
        self.timings["poison_s"] = time.perf_counter() - started
        started = time.perf_counter()
        model.train()
        fit(module, self.recipe, self.recipe.seed, self.loggers,
            f"trojan model ({self.attack.display_name}) on {len(train_set)} images")
        self.timings["trojan_train_s"] = time.perf_counter() - started
        return model.eval()


def create(overrides: Sequence[str] = (), output_dir: str | Path = ".") -> RunServices:
    """The services of the run ``python -m bdlab.run <overrides>`` would make, validated, with its attack
    set up; nothing is trained until a model is asked for. Example::

        services = create(["attack=badnets", "trainer.max_epochs=2"])
        trojan = services.trojan_model()
    """
    from bdlab.compose import compose_config
    from bdlab.pipeline import prepare

    return prepare(compose_config(list(overrides)), output_dir).services
