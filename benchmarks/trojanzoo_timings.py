"""Write ``benchmarks/trojanzoo_timings.json``: the ``trojanzoo`` grid's timings for ``python -m bdlab.bench grid``.

The grid's 448 ``results.json`` files are not in the repository; its report tables are
(``docs/trojanzoo_sweep/tables``), and so are the figures ``docs/trojanzoo.md`` gives for the run. This script
puts them together with the measurements listed below. ``benchmarks/grid.md`` says where each number comes
from. Run it from the repository root::

    python benchmarks/trojanzoo_timings.py

Every time is in the seconds of the machine that ran the grid (2 cores). Figures measured here on a loaded
CPU are scaled to it by a reference that both machines measured, as noted at each constant.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

TABLE = "docs/trojanzoo_sweep/tables/mnist_lenet__defense_{}.csv"
OUT = Path("benchmarks/trojanzoo_timings.json")

# ---- models
#: docs/trojanzoo.md, "The trojanzoo sweep": the clean reference model trains in 10 s
CLEAN_S = 10.0
#: trojaned models whose time the grid's documentation or benchmarks give (seconds, source)
DOCUMENTED_TROJAN_S = {
    "wanet": (11.0, "docs/trojanzoo.md: WaNet's trojaned model 11 s"),
    "issba": (183.0 + 15.0 + CLEAN_S, "docs/trojanzoo.md: encoder 180-185 s, encoded poisons ~15 s, + training"),
    "refool": (6.0 + CLEAN_S, "docs/trojanzoo.md: reflection sets 6 s from a cold cache, + training"),
    "imc": (2 * 60000 / 8160 + 3.27, "benchmarks/train.md: 8160 images/s over 2 epochs, 3.27 s initialisation"),
    "label_consistent": (420.0 + CLEAN_S, "docs/transformations.md: robust surrogate 6-8 min (7 min), + training"),
}
#: trojaned models that need the clean model (label-consistent's surrogate is fine-tuned from it)
NEEDS_CLEAN = ("label_consistent",)
#: measured here (benchmarks/grid.md, `+sweep=trojanzoo defense=none`, artifact jobs, 2026-12-05, load 20-30
#: on 2 cores): trojan_train_s + poison_s over the clean model's clean_train_s in the same run (461.6 s)
MEASURED_RATIO = {
    "abe": (589.0 + 1.5) / 461.6,
    "badnets": (565.6 + 1.1) / 461.6,
    "badnets_checkerboard": (634.7 + 3.0) / 461.6,
    "blended": (312.6 + 3.5) / 461.6,
    "blended_patch": (250.6 + 2.0) / 461.6,
    "input_aware": (1028.9 + 0.3) / 461.6,
}

# ---- cells
#: MNIST: 10000 test images, 5% held out for defenses; the poisoned test set is the non-target rest (~90%)
HELD_OUT, TEST, POISONED = 500, 9500, 8550
#: input filters score the held-out split and at most max_inputs clean and poisoned test inputs (their conf/)
FILTER_MAX_INPUTS = {"neo": 500, "strip": 2000, "sentinet": 500, "magnet": None}
REFORMERS = ("color_jitter", "down_upsample", "flip", "gaussian_noise", "randomized_smoothing", "shrinkpad")
INSPECTORS = ("abs", "cw_l0", "deep_inspect", "df_tnd", "k_arm", "neural_cleanse", "neuron_inspect", "pixel",
              "tabor", "uap")
#: sanitisers whose defense/art_s is their running time
SANITISERS = ("adversarial_retraining", "fine_pruning", "nad", "unlearning")
#: docs/trojanzoo.md: "hardening 94 s" (its defense/art_s, 0.1-0.2 s, leaves out the class distances)
HARDENING_S = 94.0
#: the clean model's inspection by each inspector: the grid reported only the trojaned model's; the model of
#: this attack is the grid's closest to a clean one (ASR 0.20%), so its inspection stands in for it
CLEAN_LIKE = "label_consistent"
#: measured here (benchmarks/grid.md: `+sweep=trojanzoo attack=blended defense=none,activation_clustering,
#: spectral_signature,strip`, cached models, 2026-12-05, load 30 on 2 cores): total_s of defense=none (a cell
#: without its defense) and defense_s of the two defenses no table times; scaled by STRIP's time on blended in
#: the grid (1.962 ms x 4500 inputs) over its defense_s here
MEASURED_CELL = {"none_total_s": 98.2, "activation_clustering_s": 525.8, "spectral_signature_s": 187.9,
                 "strip_defense_s": 264.8}


def table(metric: str) -> dict[str, dict[str, float]]:
    """``{attack: {defense: value}}`` of a report table (empty cells left out)."""
    with open(TABLE.format(metric)) as stream:
        return {row["attack"]: {key: float(value) for key, value in row.items()
                                if key != "attack" and not key.endswith(" std") and value}
                for row in csv.DictReader(stream)}


def trojan_seconds(attack: str) -> tuple[float, str]:
    if attack in DOCUMENTED_TROJAN_S:
        return DOCUMENTED_TROJAN_S[attack]
    if attack in MEASURED_RATIO:
        return CLEAN_S * MEASURED_RATIO[attack], "measured here, relative to the clean model"
    median = statistics.median(MEASURED_RATIO.values())
    return CLEAN_S * median, "extrapolated: the median ratio to the clean model of the models measured here"


def scored_inputs(defense: str) -> int:
    limit = FILTER_MAX_INPUTS[defense]
    return HELD_OUT + min(limit or TEST, TEST) + min(limit or POISONED, POISONED)


def main() -> None:
    art, per_input = table("art_s"), table("time_per_input_ms")
    attacks = sorted(art)
    defenses = sorted({d for row in art.values() for d in row} | {d for row in per_input.values() for d in row} |
                      {"none", "hardening", "activation_clustering", "spectral_signature"})
    strip_grid = per_input["blended"]["strip"] * scored_inputs("strip") / 1000.0
    scale = strip_grid / MEASURED_CELL["strip_defense_s"]
    base = MEASURED_CELL["none_total_s"] * scale
    data_filters = {"activation_clustering": MEASURED_CELL["activation_clustering_s"] * scale,
                    "spectral_signature": MEASURED_CELL["spectral_signature_s"] * scale}

    where = "lenet on mnist (seed 0)"  # labels as the planner writes them, so a dry run's estimates find them
    artifacts = {"clean": {"kind": "clean", "label": f"clean model: {where}", "seconds": CLEAN_S, "needs": [],
                           "source": "docs/trojanzoo.md"}}
    for attack in attacks:
        seconds, source = trojan_seconds(attack)
        artifacts[f"trojan/{attack}"] = {"kind": "trojan", "label": f"trojaned model: {attack}, {where}",
                                         "seconds": seconds,
                                         "needs": ["clean"] if attack in NEEDS_CLEAN else [], "source": source}
    for defense in INSPECTORS:
        artifacts[f"inspection/{defense}"] = {
            "kind": "inspection", "label": f"{defense} inspection of the clean model: {where}",
            "seconds": art[CLEAN_LIKE][defense], "needs": ["clean"],
            "source": f"defense/art_s of {CLEAN_LIKE} (ASR 0.20%, the grid's most clean-like model)"}
    artifacts["autoencoder/magnet"] = {"kind": "autoencoder", "label": "magnet autoencoder on mnist",
                                       "seconds": art["badnets"]["magnet"], "needs": [],
                                       "source": "MagNet's defense/art_s: the autoencoder's training time"}

    cells = []
    for attack in attacks:
        for defense in defenses:
            needs = ["clean", f"trojan/{attack}"]
            if defense in INSPECTORS:
                own, needs = art[attack][defense], [*needs, f"inspection/{defense}"]
            elif defense in SANITISERS:
                own = art[attack][defense]
            elif defense == "hardening":
                own = HARDENING_S
            elif defense in FILTER_MAX_INPUTS:
                own = per_input[attack][defense] * scored_inputs(defense) / 1000.0
                needs += ["autoencoder/magnet"] if defense == "magnet" else []
            elif defense in REFORMERS:
                own = per_input[attack][defense] * (TEST + POISONED) / 1000.0
            else:
                own = data_filters.get(defense, 0.0)
            cells.append({"name": f"{attack}/{defense}", "seconds": round(base + own, 3), "needs": needs,
                          "overrides": [f"attack={attack}", f"defense={defense}", "+sweep=trojanzoo"]})
    rows = {a: sum(c["seconds"] for c in cells if c["name"].startswith(f"{a}/")) + artifacts[f"trojan/{a}"]["seconds"]
            for a in attacks}
    notes = (f"trojanzoo grid, MNIST / LeNet, 2-epoch models, {len(attacks)} attacks x {len(defenses)} defenses; "
             f"cell = {base:.1f} s without its defense (measured, scaled x{scale:.4f}) + its defense's time; "
             "python benchmarks/trojanzoo_timings.py wrote it; benchmarks/grid.md gives every source. Row sums "
             f"(model + cells): {min(rows.values()):.0f}-{max(rows.values()):.0f} s, wanet {rows['wanet']:.0f} s "
             "(docs/trojanzoo.md: 454-723 s, wanet 516 s)")
    OUT.write_text(json.dumps({"format": "bdlab-grid-timings/1", "notes": notes,
                               "artifacts": {k: {key: v for key, v in a.items() if key != "source"}
                                             for k, a in artifacts.items()},
                               "sources": {k: a["source"] for k, a in artifacts.items()},
                               "cells": cells}, indent=1) + "\n")
    print(notes)


if __name__ == "__main__":
    main()
