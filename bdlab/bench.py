"""Benchmarks that write tables: ``python -m bdlab.bench <train|inspect|scan> [hydra overrides]``.

``train`` measures training throughput (images per second) of the same model and data,
clean and poisoned, so the cost of poisoning is visible; poisoning is timed separately.
``inspect`` times a model-inspection defense (default ``neural_cleanse``) on the trojaned model in
the batched and the sequential mode of the inversion engine, with the same epochs and images, and
gives each one's AIV of the target class and flagged classes. ``scan`` (:mod:`bdlab.bench_scan`) scans a
population of models one at a time and batched, and gives the throughput of each. ``grid``
(:mod:`bdlab.bench_grid`) replays a grid's timings on N workers: ``python -m bdlab.bench grid <dir or file>
--workers 8,16,64``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from bdlab.bench_scan import bench_scan, scan_markdown
from bdlab.cache import ArtifactCache
from bdlab.compose import compose_config
from bdlab.console import quiet_third_party
from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.errors import ConfigError, build
from bdlab.pipeline import prepare
from bdlab.training.fit import fit, fit_classifier


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_train(overrides: list[str], epochs: int, repeats: int) -> list[dict[str, object]]:
    """Images per second of clean training (the victim module) and of the attack's own training
    module (its poisoning, hooks, enhancement and co-optimisation included), best of ``repeats``."""
    cfg = compose_config(["logger=none", "trainer.enable_progress_bar=false", f"trainer.max_epochs={epochs}",
                          *overrides])
    experiment = prepare(cfg)
    data, recipe = experiment.data, experiment.recipe
    experiment.services.clean_model()  # attacks that craft poisons on it are then timed on poisoning alone
    best = {"clean": 0.0, "poisoned": 0.0}
    poison_s = float("inf")
    for _ in range(repeats):  # interleaved, best of each: the machine's load varies
        model = experiment.services.new_model()
        started = time.perf_counter()
        fit_classifier(model, data.train, recipe, experiment.services.augment())
        best["clean"] = max(best["clean"], epochs * len(data.train) / (time.perf_counter() - started))
        started = time.perf_counter()
        model, module, train_set = experiment.services.trojan_training()
        poison_s = min(poison_s, time.perf_counter() - started)
        started = time.perf_counter()
        model.train()
        fit(module, recipe, recipe.seed)
        best["poisoned"] = max(best["poisoned"], epochs * len(train_set) / (time.perf_counter() - started))
    rows = []
    for kind in ("clean", "poisoned"):
        rows.append({"dataset": data.name, "model": str(cfg.model.name),
                     "attack": experiment.attack.display_name if kind == "poisoned" else "none",
                     "images_per_s": best[kind], "relative": best[kind] / best["clean"],
                     "poison_set_s": poison_s if kind == "poisoned" else 0.0,
                     "device": device_name(experiment.services.device)})
    return rows


def bench_inspect(overrides: list[str]) -> list[dict[str, object]]:
    """Seconds per model, AIV of the target and flagged classes, batched vs sequential (a scratch cache)."""
    cfg = compose_config(["logger=none", "trainer.enable_progress_bar=false", "defense=neural_cleanse", *overrides])
    experiment = prepare(cfg)
    if not isinstance(experiment.defense, TriggerInversion):
        raise ConfigError("defense", f"{experiment.defense.name} is not a trigger-inversion defense; bench inspect "
                          "times one (neural_cleanse, tabor, pixel, k_arm, ...)")
    model, services, rows = experiment.services.trojan_model(), copy.copy(experiment.services), []
    with tempfile.TemporaryDirectory() as scratch:  # a cache of its own: every mode is timed now, on this machine
        services.cache = ArtifactCache(scratch)
        for mode in ("batched", "sequential"):
            inspector = build(cfg.defense, mode=mode)
            inspection = inspector.inspect(model, experiment.data, services)
            rows.append({"dataset": experiment.data.name, "model": str(cfg.model.name),
                         "attack": experiment.attack.display_name, "defense": inspector.name, "mode": mode,
                         "seconds": inspection.seconds, "epochs": int(inspection.extras["epochs"].sum()),
                         "aiv": float(inspection.aiv[experiment.attack.target_class]), "flagged": inspection.flagged,
                         "device": device_name(experiment.services.device)})
    for row in rows:
        row["speedup"] = rows[1]["seconds"] / row["seconds"]
    return rows


def inspect_markdown(rows: list[dict[str, object]]) -> str:
    header = ("| dataset | model | attack | defense | mode | seconds per model | vs sequential | class-epochs | "
              "AIV of the target | flagged | device |")
    lines = [header, "|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['attack']} | {r['defense']} | {r['mode']} | "
                     f"{r['seconds']:.1f} | {r['speedup']:.2f}x | {r['epochs']} | {r['aiv']:.2f} | {r['flagged']} | "
                     f"{r['device']} |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, object]]) -> str:
    header = "| dataset | model | attack | images/s | vs clean | poisoning the set (s) | device |"
    lines = [header, "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['attack']} | {r['images_per_s']:.0f} | "
                     f"{r['relative']:.1%} | {r['poison_set_s']:.2f} | {r['device']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grid"]:  # a makespan simulation with arguments of its own (bdlab.bench_grid)
        from bdlab.bench_grid import main as bench_grid

        return bench_grid(argv[1:])
    quiet_third_party()
    parser = argparse.ArgumentParser(prog="python -m bdlab.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["train", "inspect", "scan", "grid"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=mnist model=lenet")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", type=int, default=8, help="scan: the population's size")
    parser.add_argument("--scanners", default="neural_cleanse,k_arm", help="scan: comma-separated defenses")
    parser.add_argument("--manifest", type=Path, help="scan: a zoo's manifest.csv whose first --models models are "
                        "scanned (default: train a BadNets/clean population)")
    parser.add_argument("--out", type=Path, help="markdown file the table is appended to "
                        "(default: benchmarks/<benchmark>.md)")
    args = parser.parse_intermixed_args(argv)
    out = args.out or Path("benchmarks") / f"{args.benchmark}.md"
    try:
        if args.benchmark == "train":
            table = markdown(bench_train(args.overrides, args.epochs, args.repeats))
            note = f"{args.epochs} epoch(s), best of {args.repeats}"
        elif args.benchmark == "inspect":
            table, note = inspect_markdown(bench_inspect(args.overrides)), "one run of each mode"
        else:
            scanners = [name for name in args.scanners.split(",") if name]
            table = scan_markdown(bench_scan(args.overrides, args.models, scanners, args.manifest))
            note = "one scan in each mode" + (f", the first {args.models} models of {args.manifest}"
                                              if args.manifest else "")
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        return 2
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    command = shlex.join(["python", "-m", "bdlab.bench", *argv])  # the whole command, options too, to rerun it
    with out.open("a") as stream:
        stream.write(f"\n`{command}` ({stamp}, {note})\n\n"
                     f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
