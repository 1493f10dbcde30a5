"""``python -m bdlab.zoo trojaned=40 clean=40 seed=0``: a population of trojaned and clean models and its manifest.

Each model is a bdlab run's model: its run config is the zoo's dataset, model and trainer with the model's
drawn seed, recipe and attack fields (:mod:`bdlab.zoo_specs`), and it is trained by the run services
(:meth:`~bdlab.services.RunServices.trojan_model`, :meth:`~bdlab.services.RunServices.clean_model`) through the
artifact cache, so a model any zoo (or ``python -m bdlab.run`` with the same overrides) trained is reused, never
retrained. Its clean accuracy and ASR come from bdlab's evaluator on the test split.

Written under ``out``: ``models/<name>.safetensors`` (the backbone's weights), ``manifest.csv`` (the population
format ``python -m bdlab.scan`` reads: docs/zoo.md) and ``zoo.json`` (the config, every model's spec, overrides,
figures and status, timings). Everything is checked before anything is trained or written: bad input is one line
and exit 2. A model that fails to train is recorded as failed in ``zoo.json``, left out of the manifest, and the
zoo goes on. Under ``-m shard=0,1 shards=2`` each job trains its share and records it in
``shards/<shard>-of-<shards>.json``; the same command without ``-m``, ``shard`` and ``shards`` then writes the
manifest from the cache, training nothing.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from bdlab import plugins
from bdlab.attacks.base import Attack, NoAttack
from bdlab.attacks.patterns import load_pattern
from bdlab.compose import CONFIG_DIR, compose_config
from bdlab.console import quiet_third_party
from bdlab.errors import ConfigError, build, signature
from bdlab.evaluate import evaluate
from bdlab.models.weights import save_weights
from bdlab.pipeline import prepare
from bdlab.results import git_revision, package_versions, write_json_atomic
from bdlab.run import composition_error
from bdlab.zoo_specs import ANYWHERE, CLEAN, Design, ImageShape, ModelSpec, cell, hydra_value, shard_of

ZOO_FORMAT = 1
MANIFEST, RECORD, MODELS = "manifest.csv", "zoo.json", "models"
#: the groups of the run config the zoo composes with: a model is trained with (and scanned with) these
RUN_GROUPS = ("dataset", "model", "trainer")
#: the model fields a scan does not need to load a model (the recipe, and the weights training started from)
TRAINING_ONLY = ("model.lr", "model.batch_size", "model.weights")
#: manifest columns before the drawn trigger fields (the shared population format, then the zoo's own)
COLUMNS = ("name", "weights", "model", "dataset", "overrides", "trojaned", "target_class", "attack", "family",
           "poison_rate", "seed", "lr", "batch_size", "epochs")
FIGURES = ("acc", "asr", "train_s")


def run_config(overrides: Sequence[str]) -> DictConfig:
    """The run config of ``python -m bdlab.run <overrides>``: inside the zoo's Hydra app from its own config
    loader (Hydra allows one initialisation per process), elsewhere through :func:`compose_config`."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose("config", overrides=list(overrides))
    return compose_config(list(overrides))


def changed_fields(prefix: str, node: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
    """Overrides that turn ``reference`` into ``node`` (both unresolved containers), leaf by leaf."""
    overrides = []
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if key not in reference:
            overrides.append(f"+{path}={hydra_value(value)}")
        elif isinstance(value, Mapping) and isinstance(reference[key], Mapping):
            overrides += changed_fields(path, value, reference[key])
        elif value != reference[key]:
            overrides.append(f"{path}={hydra_value(value)}")
    return overrides


def zoo_families() -> list[str]:
    """The attack options a zoo can draw from: those that train a plain classifier of the run's architecture
    (a TrojanNet model carries a second network, so no ``model=`` option names it; a given model trains nothing)."""
    usable = []
    for option in plugins.group_options("attack") or []:
        node = plugins.load_option("attack", option)
        target = node.get("_target_") if node is not None else None
        cls = get_object(str(target)) if target else None
        if isinstance(cls, type) and issubclass(cls, Attack) and not issubclass(cls, NoAttack) and cls.trains \
                and cls.model_shell is Attack.model_shell:
            usable.append(option)
    return usable


def count(cfg: DictConfig, name: str, minimum: int) -> int:
    """The zoo field ``name`` as an integer >= ``minimum``, or one ConfigError line."""
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"got {value!r}, must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class ZooPlan:
    """A checked zoo: its models, the run overrides they share, and where it writes."""

    cfg: DictConfig
    specs: list[ModelSpec]
    base: list[str]  # run overrides every model shares (dataset, model, trainer and locations)
    loading: list[str]  # the part a scan needs to load a model (the manifest's ``overrides``)
    choices: dict[str, str]
    out: Path
    shard: int
    shards: int
    trigger_columns: dict[str, str]  # manifest column -> the drawn attack field it shows

    @property
    def share(self) -> list[ModelSpec]:
        """The models this job trains (all of them without sharding)."""
        assigned = shard_of(self.specs, self.shards)
        return [spec for spec in self.specs if assigned[spec.name] == self.shard]


def base_overrides(cfg: DictConfig, choices: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The run overrides of the zoo's dataset, model and trainer (their options, and each field the zoo's
    config changes from the option's own) and locations; and the part a scan needs to load a model."""
    groups = [f"{group}={choices[group]}" for group in RUN_GROUPS]
    reference = run_config(groups)
    fields = [override for group in RUN_GROUPS
              for override in changed_fields(group, OmegaConf.to_container(cfg[group], resolve=False),
                                             OmegaConf.to_container(reference[group], resolve=False))]
    locations = [f"{key}={hydra_value(cfg[key])}" for key in ("cache_dir", "data_dir") if cfg.get(key) is not None]
    loading = [o for o in fields if o.lstrip("+").startswith(("dataset.", "model."))
               and not o.lstrip("+").startswith(TRAINING_ONLY)]
    return groups + fields + locations, loading


def check_triggers(design: Design, family: str, template: DictConfig, shape: ImageShape) -> tuple[int, int] | None:
    """Refuse a drawn field the family's attack does not take, or a patch larger than the images; returns the
    trigger's fixed extent (a pattern file's, or the option's patch size) where ``position: anywhere`` needs it."""
    fields = design.triggers.get(family, {})
    taken, open_ended = signature(get_object(str(template.attack._target_)))
    for key in fields:
        if key not in taken and not open_ended:
            raise ConfigError(f"triggers.{family}.{key}", f"attack {family} has no field {key!r}; it takes "
                              f"{', '.join(taken)}")
    pattern = fields["pattern_file"] if "pattern_file" in fields else template.attack.get("pattern_file")
    if pattern is not None and "patch_size" in fields:
        raise ConfigError(f"triggers.{family}.patch_size", f"{family}'s pattern file {pattern} fixes the trigger's "
                          "size; drop patch_size or set pattern_file: null")
    side = min(shape.height, shape.width)
    size = fields.get("patch_size")
    high = max(size) if isinstance(size, (list, tuple)) else size
    if isinstance(high, (int, float)) and high > side:
        raise ConfigError(f"triggers.{family}.patch_size", f"up to {high} px, larger than the dataset's "
                          f"{shape.height}x{shape.width} images; keep it <= {side}")
    if fields.get("position") != ANYWHERE or "patch_size" in fields:
        return None
    if pattern is not None:
        extent = tuple(load_pattern(f"triggers.{family}.pattern_file", str(pattern), shape.channels).shape[1:])
    else:
        default = template.attack.get("patch_size")
        extent = (default, default) if isinstance(default, int) else tuple(default)
    if extent[0] > shape.height or extent[1] > shape.width:
        raise ConfigError(f"triggers.{family}", f"the {extent[0]}x{extent[1]} trigger is larger than the dataset's "
                          f"{shape.height}x{shape.width} images")
    return int(extent[0]), int(extent[1])


def check_spec(spec: ModelSpec, template: DictConfig, design: Design) -> None:
    """Build the model's attack from its drawn fields (its constructor checks each); a refusal names the zoo
    field that drew the value."""
    node = OmegaConf.merge(template, {"seed": spec.seed, "attack": spec.attack})
    try:
        build(node.attack, path="attack")
    except ConfigError as error:
        key = error.field.removeprefix("attack.")
        where = error.field
        if key in design.triggers.get(spec.family, {}):
            where = f"triggers.{spec.family}.{key}"
        elif key == "poison_rate":
            where = "poison_rate"
        raise ConfigError(where, f"{spec.name} drew {spec.attack.get(key)!r}: {error}") from None


def plan_zoo(cfg: DictConfig, choices: Mapping[str, str]) -> ZooPlan:
    """Check the whole zoo config and draw every model's spec; trains and writes nothing."""
    trojaned, clean = count(cfg, "trojaned", 0), count(cfg, "clean", 0)
    if trojaned == 0 and clean == 0:
        raise ConfigError("trojaned", "trojaned=0 and clean=0 build no model; give trojaned=N and/or clean=N")
    shards = count(cfg, "shards", 1)
    shard = count(cfg, "shard", 0)
    if shard >= shards:
        raise ConfigError("shard", f"got {shard}, must be in [0, {shards - 1}] for shards={shards}")
    seed = count(cfg, "seed", 0)
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file; give a folder for the zoo")
    container = OmegaConf.to_container(cfg, resolve=True)
    design = Design.from_config(container["families"], container["poison_rate"], container["triggers"],
                                container["recipe"])
    usable = zoo_families()
    unknown = [family for family in design.families if family not in usable]
    if unknown:
        raise ConfigError("families", f"no attack option {unknown[0]!r} that trains a plain model; valid: "
                          f"{', '.join(usable)}")
    base, loading = base_overrides(cfg, choices)
    data = prepare(run_config([*base, "attack=none", "logger=none"])).data  # checks every run field, loads the data
    shape = ImageShape(data.channels, data.size[0], data.size[1], data.num_classes)
    templates = {family: run_config([*base, f"attack={family}", "logger=none"]) for family in design.families}
    extents = {family: extent for family in design.families
               if (extent := check_triggers(design, family, templates[family], shape)) is not None}
    specs = design.specs(seed, trojaned, clean, shape, extents)
    for spec in specs:
        if spec.trojaned:
            check_spec(spec, templates[spec.family], design)
    reserved = set(COLUMNS) | set(FIGURES)
    fields = sorted({key for family in design.families for key in design.triggers.get(family, {})})
    columns = {f"attack_{key}" if key in reserved else key: key for key in fields}
    return ZooPlan(cfg, specs, base, loading, dict(choices), out, shard, shards, columns)


# ---- training


def weights_digest(services: Any, model: torch.nn.Module) -> str:
    """The digest of a model's state dict, names and tensors: the figures' cache key."""
    state = model.state_dict()
    return services.digest(*(part for key in sorted(state) for part in (key, state[key])))


def train_model(plan: ZooPlan, spec: ModelSpec) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of ``spec`` (from the cache, or trained now) and its figures: the seconds its training took
    (when the zoo trained it; kept in the cache with its clean accuracy and ASR, so a rerun or a larger zoo
    reports the same), clean accuracy and ASR on the test split (ASR n/a for a clean model)."""
    overrides = [*plan.base, *spec.overrides(), "logger=none"]
    services = prepare(run_config(overrides)).services
    started = time.perf_counter()
    model = services.trojan_model() if spec.trojaned else services.clean_model()
    seconds = time.perf_counter() - started
    key = services.trojan_key() if spec.trojaned else services.clean_key()
    trained = not services.artifacts["trojan_model" if spec.trojaned else "clean_model"]["reused"]

    def measure() -> dict[str, torch.Tensor]:
        data, attack = services.data, services.attack
        poisoned = attack.poison_test(data.test, services.device) if spec.trojaned else None
        figures = evaluate(model, data.test, poisoned, attack.target_class)
        # seconds are known only when this zoo trained the model (not when another run left it in the cache)
        return {"train_s": torch.tensor(seconds if trained else math.nan, dtype=torch.float64),
                "acc": torch.tensor(figures.acc, dtype=torch.float64),
                "asr": torch.tensor(figures.asr, dtype=torch.float64)}

    figures, _ = services.cached("zoo/figures", {"model": key, "weights": weights_digest(services, model)}, measure)
    return model, {"trained": trained, "cache_key": key, "overrides": overrides,
                   **{name: float(figures[name]) for name in FIGURES}}


def save_atomic(model: torch.nn.Module, path: Path) -> None:
    """``save_weights`` to a temporary file beside ``path``, then a rename: no half-written weights file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_weights(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_model(plan: ZooPlan, spec: ModelSpec, write_weights: bool) -> dict[str, Any]:
    """One model's record: trained (or read from the cache), measured and, unless a shard job, its weights
    written; a failure is recorded with its error instead of stopping the zoo."""
    record: dict[str, Any] = {**spec.record(), "weights": f"{MODELS}/{spec.name}.safetensors"}
    try:
        model, figures = train_model(plan, spec)
        if write_weights:
            save_atomic(model, plan.out / record["weights"])
        record.update(status="ok", **figures)
    except Exception as error:  # one model's failure is recorded and the zoo goes on
        record.update(status="failed", error={"type": type(error).__name__, "message": str(error),
                                              "traceback": "".join(traceback.format_exception(error))})
    return record


def progress_line(done: int, total: int, record: dict[str, Any], started: float) -> str:
    """The line printed when a model is done: what it is, whether it was trained, its figures, the time left."""
    elapsed = time.perf_counter() - started
    left = elapsed / done * (total - done)
    what = record["family"] + (f" -> {record['attack']['target_class']}" if record["kind"] != CLEAN else "")
    if record["status"] != "ok":
        return f"zoo: [{done}/{total}] {record['name']} {what}: FAILED ({record['error']['type']}: " \
               f"{record['error']['message']})"
    how = "trained" if record["trained"] else "cached"
    asr = "" if math.isnan(record["asr"]) else f"  asr {record['asr']:.1f}"
    return (f"zoo: [{done}/{total}] {record['name']} {what}: {how}  acc {record['acc']:.1f}{asr}  "
            f"({elapsed:.0f} s, about {left:.0f} s left)")


# ---- results


def manifest_row(plan: ZooPlan, record: dict[str, Any]) -> dict[str, str]:
    """A model's manifest row (docs/zoo.md, "The manifest"): where and how to load it, its ground truth, its
    drawn settings and its figures, n/a as an empty cell."""
    attack = record["attack"]
    trojaned = record["kind"] != CLEAN
    row = {"name": record["name"], "weights": record["weights"], "model": plan.choices["model"],
           "dataset": plan.choices["dataset"], "overrides": " ".join(plan.loading),
           "trojaned": "1" if trojaned else "0",
           "target_class": cell(attack.get("target_class")), "attack": record["family"] if trojaned else "",
           "family": record["family"], "poison_rate": cell(attack.get("poison_rate")), "seed": cell(record["seed"]),
           "lr": cell(record["recipe"].get("lr")), "batch_size": cell(record["recipe"].get("batch_size")),
           "epochs": cell(plan.cfg.trainer.max_epochs)}
    row.update({column: cell(attack.get(key)) for column, key in plan.trigger_columns.items()})
    row.update({name: cell(record[name]) for name in FIGURES})
    return row


def manifest_text(plan: ZooPlan, records: Sequence[dict[str, Any]]) -> str:
    """The manifest CSV of the models that trained (failed ones are left out)."""
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=[*COLUMNS, *plan.trigger_columns, *FIGURES], lineterminator="\n")
    writer.writeheader()
    for record in records:
        if record["status"] == "ok":
            writer.writerow(manifest_row(plan, record))
    return stream.getvalue()


def family_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per family: models, failures, and the mean (and for ASR the lowest) of each figure over its models."""
    summary: dict[str, dict[str, Any]] = {}
    for family in dict.fromkeys(record["family"] for record in records):
        members = [r for r in records if r["family"] == family]
        ok = [r for r in members if r["status"] == "ok"]

        def values(name: str, ok: list[dict[str, Any]] = ok) -> list[float]:
            return [r[name] for r in ok if not math.isnan(r[name])]

        summary[family] = {"models": len(members), "failed": len(members) - len(ok)}
        for name in FIGURES:
            summary[family][f"{name}_mean"] = statistics.fmean(values(name)) if values(name) else math.nan
        summary[family]["asr_min"] = min(values("asr")) if values("asr") else math.nan
    return summary


def summary_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The per-family summary as the text table the zoo prints at the end."""
    def show(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.1f}"

    lines = [f"{'family':<22}{'models':>7}{'failed':>7}{'train s':>9}{'acc':>7}{'asr':>7}{'asr min':>9}"]
    for family, row in summary.items():
        lines.append(f"{family:<22}{row['models']:>7}{row['failed']:>7}{show(row['train_s_mean']):>9}"
                     f"{show(row['acc_mean']):>7}{show(row['asr_mean']):>7}{show(row['asr_min']):>9}")
    return "\n".join(lines)


def run_zoo(plan: ZooPlan) -> dict[str, Any]:
    """Train (or reuse) this job's models in order, printing one line each, and write its results."""
    share, started = plan.share, time.perf_counter()
    sharded = plan.shards > 1
    records = []
    for done, spec in enumerate(share, 1):
        records.append(build_model(plan, spec, write_weights=not sharded))
        print(progress_line(done, len(share), records[-1], started), flush=True)
    total_s = time.perf_counter() - started
    summary = family_summary(records)
    payload = {"format": ZOO_FORMAT, "shard": plan.shard, "shards": plan.shards,
               "counts": {"models": len(records), "trained": sum(bool(r.get("trained")) for r in records),
                          "failed": sum(r["status"] != "ok" for r in records)},
               "timings": {"total_s": total_s,
                           "train_s": sum(r["train_s"] for r in records if r.get("trained"))},
               "families": summary, "base_overrides": plan.base, "manifest_overrides": plan.loading,
               "config": OmegaConf.to_container(plan.cfg, resolve=True), "models": records,
               "versions": package_versions(), "git_revision": git_revision()}
    print(summary_table(summary))
    counts = payload["counts"]
    if sharded:
        path = plan.out / "shards" / f"{plan.shard}-of-{plan.shards}.json"
        write_json_atomic(path, payload)
        print(f"zoo: shard {plan.shard} of {plan.shards}: {counts['models']} models ({counts['trained']} trained, "
              f"{counts['failed']} failed) in {total_s:.0f} s; recorded in {path}. When every shard is done, run the "
              "same command without -m, shard and shards to write the manifest (it trains nothing).")
        return payload
    write_json_atomic(plan.out / RECORD, payload)
    write_text_atomic(plan.out / MANIFEST, manifest_text(plan, records))
    print(f"zoo: {counts['models']} models ({counts['trained']} trained, {counts['failed']} failed) in "
          f"{total_s:.0f} s; manifest: {plan.out / MANIFEST}")
    return payload


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="zoo")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    hydra_cfg = HydraConfig.get()
    try:
        plan = plan_zoo(cfg, {group: str(hydra_cfg.runtime.choices[group]) for group in RUN_GROUPS})
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(2)
        return
    run_zoo(plan)


def cli() -> None:
    """:func:`main`, with Hydra's composition errors (an unknown option or field) as one line, exit 2."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        plugins.plugin_searchpath()
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    plugins.install()
    try:
        main()
    except ConfigCompositionException as error:
        print(f"bdlab: invalid config: {composition_error(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
