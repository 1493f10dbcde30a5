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
from bdlab.errors import ConfigError
from bdlab.pipeline import poisoned_training_set, prepare
from bdlab.training.augment import TrainAugment
from bdlab.training.fit import fit_classifier


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_train(overrides: list[str], epochs: int, repeats: int) -> list[dict[str, object]]:
    cfg = compose_config(["logger=none", "trainer.enable_progress_bar=false", f"trainer.max_epochs={epochs}",
                          *overrides])
    experiment = prepare(cfg)
    data = experiment.data
    started = time.perf_counter()
    poisoned = poisoned_training_set(experiment, cfg.cache_dir)
    poison_s = time.perf_counter() - started
    augment = TrainAugment(data.crop_padding, data.hflip)
    best = {"clean": 0.0, "poisoned": 0.0}
    for _ in range(repeats):  # interleaved, best of each: the machine's load varies
        for kind, train in (("clean", data.train), ("poisoned", poisoned)):
            model = experiment.new_model()
            started = time.perf_counter()
            fit_classifier(model, train, cfg, train_transform=augment)
            best[kind] = max(best[kind], epochs * len(train) / (time.perf_counter() - started))
    rows = []
    for kind in ("clean", "poisoned"):
        rows.append({"dataset": data.name, "model": str(cfg.model.name),
                     "attack": experiment.attack.name if kind == "poisoned" else "none",
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
