"""Benchmarks that write tables: ``python -m bdlab.bench train [hydra overrides]``.

``train`` measures training throughput (images per second) of the same model and data,
clean and poisoned, so the cost of poisoning is visible; poisoning is timed separately.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from bdlab.compose import compose_config
from bdlab.console import quiet_third_party
from bdlab.errors import ConfigError
from bdlab.pipeline import prepare, trojan_training
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
    experiment.resources.clean_model()  # attacks that craft poisons on it are then timed on poisoning alone
    best = {"clean": 0.0, "poisoned": 0.0}
    poison_s = float("inf")
    for _ in range(repeats):  # interleaved, best of each: the machine's load varies
        model = experiment.new_model()
        started = time.perf_counter()
        fit_classifier(model, data.train, recipe, experiment.augment())
        best["clean"] = max(best["clean"], epochs * len(data.train) / (time.perf_counter() - started))
        started = time.perf_counter()
        model, module, train_set = trojan_training(experiment)
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
                     "device": device_name(experiment.device)})
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    header = "| dataset | model | attack | images/s | vs clean | poisoning the set (s) | device |"
    lines = [header, "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['attack']} | {r['images_per_s']:.0f} | "
                     f"{r['relative']:.1%} | {r['poison_set_s']:.2f} | {r['device']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = argparse.ArgumentParser(prog="python -m bdlab.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["train"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=mnist model=lenet")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train.md"),
                        help="markdown file the table is appended to")
    args = parser.parse_args(argv)
    try:
        rows = bench_train(args.overrides, args.epochs, args.repeats)
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with args.out.open("a") as stream:
        stream.write(f"\n`python -m bdlab.bench train {' '.join(args.overrides)}` ({stamp}, {args.epochs} epoch(s), "
                     f"best of {args.repeats})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
