"""The model zoo's population design: which models a zoo holds, each drawn from ``(seed, kind, index)`` alone.

A zoo of ``trojaned=N clean=M seed=S`` holds the models ``trojan-000 ... trojan-(N-1)`` and ``clean-000 ...
clean-(M-1)``. Model ``i`` of a kind draws everything it is from its own generator,
``random.Random(f"{S}/{kind}/{i}")``, and its attack family comes round-robin from a seeded shuffle of the
families list, so a zoo of 40 + 40 holds the 20 + 20 zoo's models exactly (same names, same settings, the
same cache keys, hence the same weights). :mod:`bdlab.zoo` trains them; docs/zoo.md describes the design.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bdlab.errors import ConfigError

TROJAN, CLEAN = "trojan", "clean"
#: ``position: anywhere`` in a family's triggers: the patch's top-left pixel uniformly anywhere it fits
ANYWHERE = "anywhere"
#: the recipe fields a model draws, each from a list of choices (``model.<field>`` of the run config)
RECIPE_FIELDS = ("lr", "batch_size")
# a string Hydra's override grammar reads back as the same string without quotes
_PLAIN = re.compile(r"^[A-Za-z_/][\w\-./]*$")
_WORDS = ("null", "true", "false", "nan", "inf")


def hydra_value(value: Any) -> str:
    """``value`` written in Hydra's override grammar (``0.05``, ``[3,12]``, ``null``, ``'a b'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _WORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cell(value: Any) -> str:
    """``value`` as a manifest cell: empty for none or NaN (not applicable), lists as JSON."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)  # a float in full: what the model measured, read back exactly


def is_range(value: Any) -> bool:
    """Whether a trigger field's setting is a ``[low, high]`` range (two numbers, not bools)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def check_range_field(name: str, value: Any) -> tuple[float, float]:
    """A ``[low, high]`` setting, or one ConfigError line naming ``name``."""
    if not is_range(value):
        raise ConfigError(name, f"got {value!r}, must be [low, high] (two numbers)")
    low, high = value
    if low > high:
        raise ConfigError(name, f"low {low} > high {high}; give [low, high] with low <= high")
    return low, high


def draw(rng: random.Random, bounds: Sequence[float]) -> int | float:
    """Uniform in ``[low, high]``: an integer when both bounds are integers, else a float kept to 3 decimals
    (the value the config states and the cache key holds)."""
    low, high = bounds
    if isinstance(low, int) and isinstance(high, int):
        return rng.randint(low, high)
    return round(rng.uniform(low, high), 3)


@dataclass(frozen=True)
class ImageShape:
    """What the drawn settings depend on: the dataset's channels, image size and classes."""

    channels: int
    height: int
    width: int
    classes: int


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo: its name, kind, attack family, training seed, recipe and drawn attack fields
    (``target_class``, ``poison_rate`` and the trigger's own; empty for a clean model)."""

    name: str
    kind: str
    index: int
    family: str
    seed: int
    recipe: dict[str, Any]
    attack: dict[str, Any] = field(default_factory=dict)

    @property
    def trojaned(self) -> bool:
        """Whether the model carries a backdoor (its ground truth)."""
        return self.kind == TROJAN

    def overrides(self) -> list[str]:
        """The run-config overrides that make this model (after the zoo's dataset, model and trainer ones)."""
        return [f"seed={self.seed}", *(f"model.{key}={hydra_value(value)}" for key, value in self.recipe.items()),
                f"attack={self.family if self.trojaned else 'none'}",
                *(f"attack.{key}={hydra_value(value)}" for key, value in self.attack.items())]

    def record(self) -> dict[str, Any]:
        """The spec as ``zoo.json`` lists it."""
        return {"name": self.name, "kind": self.kind, "index": self.index, "family": self.family, "seed": self.seed,
                "recipe": dict(self.recipe), "attack": dict(self.attack)}


@dataclass(frozen=True)
class Design:
    """The population a zoo draws from, TrojAI's round design scaled to MNIST / LeNet and synthetic RGB
    (TrojAI rounds 1-4: triggers vary in type, size, position, colour and opacity, the target class and
    the poisoning fraction; clean and poisoned models are trained alike). Defaults: conf/zoo.yaml.

    Args:
        families: the attack options trojaned models are spread over, round-robin by index in an order
            shuffled by the seed (balanced: 40 models over 8 families give 5 each).
        poison_rate: ``[low, high]`` of every trojaned model's poisoning rate (a family's ``triggers`` entry
            may set its own).
        triggers: per family, the attack fields each model draws: ``[low, high]`` uniform (integers when both
            bounds are), a scalar fixed; ``position: anywhere`` puts the patch's top-left pixel uniformly where
            the patch fits; ``color: [low, high]`` draws one level per channel (grey, or RGB on 3 channels).
        recipe: ``lr`` and ``batch_size`` lists, one drawn per model (trojaned and clean alike).
    """

    families: tuple[str, ...]
    poison_rate: tuple[float, float]
    triggers: dict[str, dict[str, Any]]
    recipe: dict[str, tuple[Any, ...]]

    @classmethod
    def from_config(cls, families: Any, poison_rate: Any, triggers: Any, recipe: Any) -> Design:
        """The design of the zoo config's fields (plain containers), or one ConfigError line."""
        if not isinstance(families, (list, tuple)) or not families or not all(isinstance(f, str) for f in families):
            raise ConfigError("families", f"got {families!r}, must be a non-empty list of attack options")
        repeated = sorted({f for f in families if families.count(f) > 1})
        if repeated:
            raise ConfigError("families", f"{', '.join(repeated)} listed twice; name each family once")
        if not isinstance(triggers, Mapping):
            raise ConfigError("triggers", f"got {triggers!r}, must map families to their drawn fields")
        for family, fields in triggers.items():
            if not isinstance(fields, Mapping):
                raise ConfigError(f"triggers.{family}", f"got {fields!r}, must map attack fields to settings")
            for key, value in fields.items():
                if key == "target_class":
                    raise ConfigError(f"triggers.{family}.{key}", "every trojaned model draws its target uniformly "
                                      "over the classes; remove it")
                if key == "position":
                    continue  # anywhere, or a fixed corner or [row, col] the attack checks
                if isinstance(value, (list, tuple)):
                    check_range_field(f"triggers.{family}.{key}", value)
        if not isinstance(recipe, Mapping):
            raise ConfigError("recipe", f"got {recipe!r}, must map {', '.join(RECIPE_FIELDS)} to lists of choices")
        for key, choices in recipe.items():
            if key not in RECIPE_FIELDS:
                raise ConfigError(f"recipe.{key}", f"no such field; recipe takes {', '.join(RECIPE_FIELDS)}")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError(f"recipe.{key}", f"got {choices!r}, must be a non-empty list of choices")
        return cls(tuple(families), check_range_field("poison_rate", poison_rate),
                   {str(k): dict(v) for k, v in triggers.items()}, {str(k): tuple(v) for k, v in recipe.items()})

    def family_order(self, seed: int) -> list[str]:
        """The families in the seed's shuffled order: trojaned model ``i`` belongs to ``order[i % len(order)]``."""
        order = list(self.families)
        random.Random(f"{seed}/families").shuffle(order)
        return order

    def spec(self, seed: int, kind: str, index: int, shape: ImageShape,
             extents: Mapping[str, tuple[int, int]] | None = None) -> ModelSpec:
        """Model ``index`` of ``kind``, a function of ``(seed, kind, index)`` and the design alone.

        ``extents`` gives, per family whose patch size is not drawn, the trigger's fixed height and width
        (a pattern file's), for ``position: anywhere``."""
        rng = random.Random(f"{seed}/{kind}/{index}")
        model_seed = rng.randrange(1_000_000)
        recipe = {key: rng.choice(choices) for key, choices in self.recipe.items()}
        name = f"{kind}-{index:03d}"
        if kind == CLEAN:
            return ModelSpec(name, kind, index, CLEAN, model_seed, recipe)
        order = self.family_order(seed)
        family = order[index % len(order)]
        attack: dict[str, Any] = {"target_class": rng.randrange(shape.classes),
                                  "poison_rate": draw(rng, self.poison_rate)}
        fields = self.triggers.get(family, {})
        for key in sorted(fields):
            value = fields[key]
            if key == "position":
                continue  # last: where the patch may go depends on its size
            if key == "color" and is_range(value):
                attack[key] = [draw(rng, value) for _ in range(shape.channels)]
                if shape.channels == 1:
                    attack[key] = attack[key][0]
            else:
                attack[key] = draw(rng, value) if is_range(value) else value
        if fields.get("position") == ANYWHERE:
            size = attack.get("patch_size")
            height, width = (size, size) if isinstance(size, int) else (extents or {})[family]
            attack["position"] = [rng.randint(0, shape.height - height), rng.randint(0, shape.width - width)]
        elif "position" in fields:
            attack["position"] = fields["position"]
        return ModelSpec(name, kind, index, family, model_seed, recipe, attack)

    def specs(self, seed: int, trojaned: int, clean: int, shape: ImageShape,
              extents: Mapping[str, tuple[int, int]] | None = None) -> list[ModelSpec]:
        """The zoo's models, kinds interleaved (trojan-000, clean-000, trojan-001, ...) so a zoo stopped
        half-way holds some of each."""
        return [self.spec(seed, kind, index, shape, extents) for index in range(max(trojaned, clean))
                for kind, count in ((TROJAN, trojaned), (CLEAN, clean)) if index < count]


def shard_of(specs: Sequence[ModelSpec], shards: int) -> dict[str, int]:
    """Which of ``shards`` jobs trains each model: each family's models (and the clean ones) are dealt out in
    turn, so every job gets a like share of the expensive families."""
    assigned: dict[str, int] = {}
    dealt = 0
    for family in dict.fromkeys(spec.family for spec in specs):
        for spec in (s for s in specs if s.family == family):
            assigned[spec.name] = dealt % shards
            dealt += 1
    return assigned
