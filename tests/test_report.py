"""``python -m bdlab.report``: it leads with the ASR left under each defense and its clean-accuracy cost;
every table cell is the matching results.json metric; bad input is one line per problem; nothing useful
to report is a non-zero exit."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bdlab.attacks.base import Attack
from bdlab.defenses.base import NoDefense
from bdlab.defenses.data_filtering.activation_clustering import ActivationClustering
from bdlab.defenses.input_filtering.strip import STRIP
from bdlab.defenses.input_reformation.base import ShrinkPad
from bdlab.defenses.model_inspection.neural_cleanse import NeuralCleanse
from bdlab.defenses.model_sanitisation.fine_pruning import FinePruning
from bdlab.report import main as report_main
from bdlab.reporting import residual
from bdlab.reporting.collect import collect
from bdlab.reporting.grid import grids, label
from bdlab.reporting.heatmaps import heatmap_figure
from bdlab.reporting.scales import colour_range
from bdlab.reporting.tables import slug
from bdlab.results import RESULTS_FORMAT, show_value, write_json_atomic

# the session-wide tiny_sweep fixture, shared with the other sweep tests (one run for all)
pytest_plugins = ["tests.sweep_helpers"]


def write_result(path: Path, attack: str = "badnets", defense: str = "none", seed: int = 0,
                 metrics: dict[str, float] | None = None, status: str = "ok", residual: dict[str, Any] | None = None,
                 **attack_params: Any) -> Path:
    """A results.json as bdlab.run writes it, reduced to what the report reads."""
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": RESULTS_FORMAT, "status": status, "dataset": "mnist", "model": "lenet", "attack": attack,
               "defense": defense, "seed": seed, "metrics": metrics or {}, "residual": residual or {},
               "config": {"seed": seed, "dataset": {"_target_": "bdlab.datasets.MNIST"}, "model": {"name": "lenet"},
                          "attack": {"_target_": attack, "seed": seed, **attack_params},
                          "defense": {"_target_": defense}}}
    if status == "failed":
        payload["error"] = {"type": "RuntimeError", "message": "out of memory", "traceback": "Traceback ..."}
    (path / "results.json").write_text(json.dumps(payload))
    return path / "results.json"


def read_table(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """A wide CSV table as ``{(attack, defense): (mean, std)}`` (strings, empty when no value)."""
    with path.open() as stream:
        rows = list(csv.reader(stream))
    header, body = rows[0], rows[1:]
    return {(row[0], header[i]): (row[i], row[i + 1]) for row in body for i in range(1, len(header), 2)}


def test_every_table_cell_equals_its_results_json_metric(tiny_sweep: tuple[Path, subprocess.CompletedProcess],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep_dir, _ = tiny_sweep
    assert report_main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    markdown = capsys.readouterr().out
    checked = 0
    for path in sweep_dir.glob("*/results.json"):
        run = json.loads(path.read_text())
        if run["status"] != "ok":
            continue
        name = slug(f"synthetic / lenet (model.batch_size={run['config']['model']['batch_size']})")
        tables = tmp_path / "report" / "tables"
        assert [key for key, _ in run["headline"]][:3] == ["trojan/acc", "trojan/asr", "attack/cad"] or \
            run["attack"] == "none"
        # the lead table: what the run's defense declares as the ASR left (none: the undefended ASR; flip: defense/asr)
        left = run["metrics"].get(run["residual"]["asr"])
        assert run["residual"]["asr"] == ("trojan/asr" if run["defense"] == "none" else "defense/asr")
        assert read_table(tables / f"{name}__residual_asr.csv")[run["attack"], run["defense"]] == \
            ((repr(left), "") if left is not None else ("", "")), path
        for metric, _ in run["headline"]:
            if metric not in run["metrics"]:
                continue
            if metric.split("/")[0] in ("trojan", "clean", "attack"):  # once per attack, in the attack table
                row = next(r for r in csv.DictReader((tables / f"{name}__attacks.csv").open())
                           if r["attack"] == run["attack"])
                mean, std = row[metric], row[f"{metric} std"]
            else:
                table = tables / f"{name}__{slug(metric)}.csv"
                mean, std = read_table(table)[run["attack"], run["defense"]]
                assert (tmp_path / "report" / "heatmaps" / table.with_suffix(".png").name).is_file()
            assert float(mean) == run["metrics"][metric] and std == "", (path, metric)  # one seed: no std
            checked += 1
    assert checked >= 6 * 3  # trojan/acc, trojan/asr, attack/cad at least, in the six successful cells
    assert "**failed**" in markdown and markdown.count("- failed: synthetic / lenet (model.batch_size=0)") == 6
    assert "model.batch_size: got 0, must be >= 1" in markdown
    long_rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert {row["metric"] for row in long_rows} >= {"clean/acc", "trojan/tmc", "defense/ard"}


def test_mean_and_std_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for seed, asr in enumerate([90.0, 92.0, 97.0]):
        write_result(tmp_path / f"run{seed}", defense="shrinkpad", seed=seed, metrics={"defense/asr": asr})
        # the attack's figure in two defenses' runs: each seed's trojaned model counts once
        for defense in ("none", "strip"):
            write_result(tmp_path / f"{defense}{seed}", defense=defense, seed=seed, metrics={"trojan/asr": asr + 1})
    write_result(tmp_path / "run3", defense="shrinkpad", seed=3, status="failed")
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| badnets | 93.00 ± 3.61 (1 failed) |" in out and "| badnets | 94.00 ± 3.61 |" in out
    mean, std = read_table(tmp_path / "report" / "tables" / "mnist_lenet__defense_asr.csv")["badnets", "shrinkpad"]
    assert float(mean) == pytest.approx(93.0) and float(std) == pytest.approx(math.sqrt(13.0))
    attacks = list(csv.DictReader((tmp_path / "report" / "tables" / "mnist_lenet__attacks.csv").open()))
    assert [(r["attack"], float(r["trojan/asr"]), float(r["trojan/asr std"])) for r in attacks] == \
        [("badnets", pytest.approx(94.0), pytest.approx(math.sqrt(13.0)))]


def test_one_seed_shows_the_mean_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A single value has no spread: no "± 0.00" in the Markdown, an empty std in the CSV tables."""
    write_result(tmp_path / "run", defense="shrinkpad", metrics={"defense/asr": 12.5, "trojan/asr": 99.5})
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| badnets | 12.50 |" in out and "| badnets | 99.50 |" in out
    assert "±" not in out.split("## mnist / lenet")[1]
    tables = tmp_path / "report" / "tables"
    assert read_table(tables / "mnist_lenet__defense_asr.csv")["badnets", "shrinkpad"] == ("12.5", "")
    assert next(csv.DictReader((tables / "mnist_lenet__attacks.csv").open()))["trojan/asr std"] == ""
    assert {row["std"] for row in csv.DictReader((tmp_path / "report" / "results.csv").open())} == {""}


def test_a_metric_that_does_not_apply_reads_n_a(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """NaN (the run says the metric does not apply) and an absent key read "n/a", never 0 or blank; a cell
    with no run at all reads "missing"."""
    write_result(tmp_path / "a", defense="neural_cleanse", metrics={"defense/mjs": 0.5})
    write_result(tmp_path / "b", attack="wanet", defense="neural_cleanse", metrics={"defense/mjs": math.nan})
    write_result(tmp_path / "c", attack="wanet", defense="strip", metrics={"defense/tpr": 80.0})
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # a defense's table has the columns of the defenses that report its metric
    mjs, tpr = out.split("`defense/mjs`")[1].split("###")[0], out.split("`defense/tpr`")[1].split("##")[0]
    assert "| attack \\ defense | neural_cleanse |" in mjs and "| badnets | 0.50 |" in mjs and "| wanet | n/a |" in mjs
    assert "| attack \\ defense | strip |" in tpr and "| badnets | missing |" in tpr and "| wanet | 80.00 |" in tpr
    assert read_table(tmp_path / "report" / "tables" / "mnist_lenet__defense_mjs.csv")["wanet", "neural_cleanse"] \
        == ("", "")


def test_efficacy_specificity_auc_when_the_poisoning_rate_is_swept(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    # (rate, CAD, ASR); the last point's CAD exceeds the paper's 3-point bound and is left out
    for rate, cad, asr in [(0.01, 0.1, 50.0), (0.05, 0.5, 90.0), (0.1, 1.0, 99.0), (0.2, 5.0, 100.0)]:
        for defense in ("none", "strip"):  # the same model under two defenses counts once
            write_result(tmp_path / f"{rate}-{defense}", defense=defense, poison_rate=rate,
                         metrics={"attack/cad": cad, "trojan/asr": asr})
    assert report_main([str(tmp_path)]) == 0
    x, y = [0.0, 4 / 9, 1.0], [0.0, 40 / 49, 1.0]
    auc = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(2))
    out = capsys.readouterr().out
    assert f"| mnist / lenet | badnets | 0.01, 0.05, 0.1 | {auc:.3f} |" in out
    assert "| attack | `attack/cad` | `trojan/asr` |" in out and "| badnets (poison_rate=0.05) | 0.50 | 90.00 |" in out
    assert (tmp_path / "report" / "tradeoff_mnist_lenet.png").is_file()
    rows = list(csv.DictReader((tmp_path / "report" / "tradeoff.csv").open()))
    assert [float(r["poison_rate"]) for r in rows] == [0.01, 0.05, 0.1] and float(rows[0]["auc"]) == pytest.approx(auc)


def test_unreadable_files_are_skipped_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_result(tmp_path / "good", metrics={"trojan/asr": 99.0})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"format": 1, "status": ')
    newer = write_result(tmp_path / "newer")
    newer.write_text(newer.read_text().replace(f'"format": {RESULTS_FORMAT}', '"format": 99'))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "results.json").write_text('{"format": 1, "status": "ok"}')
    (tmp_path / "killed" / ".hydra").mkdir(parents=True)
    assert report_main([str(tmp_path), str(tmp_path / "nowhere"), "--out", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    problems = captured.err.splitlines()
    assert len(problems) == 4
    assert "broken/results.json: skipped, corrupted JSON" in problems[0]
    assert "newer/results.json: skipped, incompatible results format 99; this bdlab reads format 1" in problems[1]
    assert "partial/results.json: skipped, not a complete results file (missing dataset" in problems[2]
    assert problems[3].endswith("nowhere: no such file or directory")
    assert "## Skipped files" in captured.out and "killed: job directory without results.json" in captured.out


def test_nothing_to_report_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.splitlines() == [f"bdlab report: {tmp_path / 'empty'}: no results.json found",
                                                    "bdlab report: no usable results.json: nothing to report"]
    write_result(tmp_path / "failed", status="failed")
    assert report_main([str(tmp_path / "failed")]) == 1
    captured = capsys.readouterr()
    assert "every run failed" in captured.err and "RuntimeError: out of memory" in captured.out


def test_report_logs_one_wandb_summary_run_offline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_result(tmp_path / "run", metrics={"trojan/asr": 99.0, "trojan/acc": 98.0})
    assert report_main([str(tmp_path), "--wandb"]) == 0
    assert len(list((tmp_path / "report" / "wandb").glob("offline-run-*"))) == 1


def test_terminal_values_keep_counts_whole_and_show_not_applicable() -> None:
    assert show_value(60000) == "60000"
    assert show_value(98.2210) == "98.22"
    assert show_value(None) == "n/a" and show_value(float("nan")) == "n/a"
    assert show_value([0.5, float("nan")]) == "[0.5, n/a]"


# attack=badnets,blended x defense=none,strip,shrinkpad,neural_cleanse,fine_pruning, as results.json files
GRID_DEFENSES = {"none": NoDefense, "strip": STRIP, "shrinkpad": ShrinkPad, "neural_cleanse": NeuralCleanse,
                 "fine_pruning": FinePruning}
# what each category answers "does it work" with: (ASR left, clean-accuracy cost); an inspector gives a verdict
RESIDUAL_KEYS = {"none": ("trojan/asr", 0.0), "strip": ("defense/asr_after_rejection", "defense/acc_cost"),
                 "shrinkpad": ("defense/asr", "defense/cad"), "neural_cleanse": (None, None),
                 "fine_pruning": ("defense/asr", "defense/cad")}


def cell_metrics(row: int, defense: str) -> dict[str, float]:
    """One run's metrics under each category's real keys; the attack's own are the same in all of its row's
    runs, and no defense's residual ASR equals the undefended one."""
    attack = {"clean/acc": 99.14, "trojan/acc": 99.1 - row, "trojan/asr": 99.93 - row, "attack/cad": 0.04 + row,
              "attack/psnr": 19.4 + row, "attack/linf": 255.0, "trojan/nsr": 0.857}
    own = {
        "none": {},
        "strip": {"defense/threshold": 0.02, "defense/fpr": 5.1, "defense/tpr": 91.5 - row, "defense/roc_auc": 0.97,
                  "defense/acc_after_rejection": 94.2, "defense/acc_cost": 4.93 + row,
                  "defense/time_per_input_ms": 0.31, "defense/asr_after_rejection": 8.41 + 4 * row},
        "shrinkpad": {"defense/acc": 97.5, "defense/asr": 13.2 + row, "defense/acc_before": 99.1 - row,
                      "defense/asr_before": 99.93 - row, "defense/ard": 86.73 - 2 * row, "defense/cad": 1.6 + row,
                      "defense/time_per_input_ms": 0.05},
        "neural_cleanse": {"defense/aiv_max": 3.79, "defense/flagged": 1 - row, "defense/aiv_target": 3.79 - 2.59 * row,
                           "defense/target_flagged": float(1 - row), "defense/mln": 5.68, "defense/art_s": 498.5,
                           "defense/mjs": math.nan if row else 0.5, "defense/clean_aiv_max": 1.79},
        "fine_pruning": {"defense/acc": 99.02, "defense/asr": 100.0 - 40 * row, "defense/acc_before": 99.1 - row,
                         "defense/asr_before": 99.93 - row, "defense/ard": -0.07 + 39 * row, "defense/cad": 0.17 - row,
                         "defense/art_s": 59.9, "defense/nsr": 0.857},
    }[defense]
    return {**attack, **own}


def write_grid(root: Path) -> dict[tuple[str, str], dict[str, float]]:
    """The grid's results.json files as bdlab.run writes them (headline and residual from the real classes)."""
    written = {}
    for row, attack in enumerate(("badnets", "blended")):
        for defense, cls in GRID_DEFENSES.items():
            metrics = cell_metrics(row, defense)
            write_json_atomic(root / f"{attack}-{defense}" / "results.json", {
                "format": RESULTS_FORMAT, "status": "ok", "dataset": "mnist", "model": "lenet", "attack": attack,
                "defense": defense, "seed": 0, "metrics": metrics,
                "headline": [list(item) for item in dict([*Attack.headline_metrics, *cls.headline_metrics]).items()],
                "residual": cls.residual.record(),
                "config": {"seed": 0, "dataset": {"_target_": "bdlab.datasets.MNIST"}, "model": {"name": "lenet"},
                           "attack": {"_target_": attack, "seed": 0}, "defense": {"_target_": cls.__name__}}})
            written[attack, defense] = metrics
    return written


def markdown_cells(markdown: str, heading: str) -> dict[tuple[str, str], str]:
    """The table under the first heading that starts with ``heading``, as ``{(row, column): text}``."""
    lines = markdown.split(heading, 1)[1].split("\n\n")[1].splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {(row[0], column): cell for row in rows[2:] for column, cell in zip(rows[0][1:], row[1:])}


def test_the_report_leads_with_the_asr_left_under_each_defense(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The first table is the residual ASR: each cell is its run's own figure of the defense's category (the
    undefended ASR only under none), an inspector's cell its verdict; next the clean-accuracy cost (n/a for an
    inspector, 0 for no defense), then the attacks once each; checked cell by cell."""
    for defense, (asr, cost) in RESIDUAL_KEYS.items():
        assert (GRID_DEFENSES[defense].residual.asr, GRID_DEFENSES[defense].residual.cost) == (asr, cost)
    written = write_grid(tmp_path / "grid")
    assert report_main([str(tmp_path / "grid"), "--out", str(tmp_path / "report")]) == 0
    markdown = capsys.readouterr().out
    setting = markdown.split("## mnist / lenet", 1)[1]
    assert setting.index("### Does the defense work?") < setting.index("### What it costs") < \
        setting.index("### The attacks") < setting.index("— `defense/")
    assert setting.split("###")[1].startswith(" Does the defense work?")  # it leads
    shown, costs = markdown_cells(setting, "### Does the defense work?"), markdown_cells(setting, "### What it costs")
    tables = tmp_path / "report" / "tables"
    left = read_table(tables / "mnist_lenet__residual_asr.csv")
    lost = read_table(tables / "mnist_lenet__residual_cost.csv")
    assert len(shown) == len(costs) == len(written) == 10
    for (attack, defense), metrics in written.items():
        asr, cost = RESIDUAL_KEYS[defense]
        if asr is None:  # an inspector: flagged or missed, with the target's AIV
            word = "flagged" if metrics["defense/target_flagged"] else "missed"
            assert shown[attack, defense] == f"{word} (AIV {metrics['defense/aiv_target']:.2f})"
            assert left[attack, defense] == ("", "")
        else:
            assert shown[attack, defense] == f"{metrics[asr]:.2f}" and left[attack, defense] == (repr(metrics[asr]), "")
        expected_cost = cost if not isinstance(cost, str) else metrics[cost]
        assert costs[attack, defense] == ("n/a" if cost is None else f"{expected_cost:.2f}")
        assert lost[attack, defense] == (("", "") if cost is None else (repr(float(expected_cost)), ""))
    assert shown["badnets", "strip"] == "8.41" and shown["badnets", "none"] == "99.93"
    assert shown["badnets", "neural_cleanse"] == "flagged (AIV 3.79)" and costs["badnets", "none"] == "0.00"
    # the attacks: one row each, their figures once, not repeated in every defense's column
    attacks = markdown_cells(setting, "### The attacks")
    assert {row for row, _ in attacks} == {"badnets", "blended"}
    assert attacks["badnets", "`trojan/asr`"] == "99.93" and attacks["blended", "`attack/cad`"] == "1.04"
    assert setting.count("99.93") == 2  # the residual cell under none, and the attack row
    assert not (tables / "mnist_lenet__trojan_asr.csv").exists()
    # a defense's own table has the columns of the defenses that report it
    assert set(markdown_cells(setting, "### Input filtering: TPR")) == {("badnets", "strip"), ("blended", "strip")}
    assert (tmp_path / "report" / "heatmaps" / "mnist_lenet__residual_asr.png").is_file()


def test_an_inspectors_verdict_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for seed, (flagged, aiv) in enumerate([(1.0, 3.0), (0.0, 1.0)]):
        write_result(tmp_path / f"nc{seed}", defense="neural_cleanse", seed=seed,
                     metrics={"defense/target_flagged": flagged, "defense/aiv_target": aiv},
                     residual=NeuralCleanse.residual.record())
    assert report_main([str(tmp_path)]) == 0
    assert markdown_cells(capsys.readouterr().out, "### Does the defense work?")["badnets", "neural_cleanse"] == \
        "flagged 1/2 (AIV 2.00 ± 1.41)"


def test_heatmap_colours_are_fixed_per_metric(tmp_path: Path) -> None:
    """0-100 for rates however narrow the grid's values, 0-1 for AUC, -100-100 for points; a metric without
    natural bounds (seconds) takes the grid's range."""
    write_grid(tmp_path / "grid")
    grid = grids(label(collect([tmp_path / "grid"]).records))[0]

    def colour_limits(metric: str, title: str) -> tuple[float, float]:
        return heatmap_figure(grid, metric, title).axes[0].images[0].get_clim()

    assert colour_limits(residual.ASR, "ASR left under each defense (%)") == (0.0, 100.0)
    assert colour_limits("defense/tpr", "Input filtering: TPR at 5% FPR (%; TrojanZoo Table 10)") == (0.0, 100.0)
    assert colour_limits("defense/roc_auc", "Input filtering: ROC-AUC") == (0.0, 1.0)
    assert colour_limits(residual.COST, "Clean accuracy lost (points)") == (-100.0, 100.0)
    assert colour_limits("defense/art_s", "ART (s)") == (59.9, 498.5)
    # from the key alone (results files without titles), and "top 10%" in a title is no unit
    assert colour_range("defense/asr_after_rejection") == colour_range("trojan/acc") == (0.0, 100.0)
    assert colour_range("defense/acc_cost") == (-100.0, 100.0)
    assert colour_range("trojan/nsr", "NSR of the trojaned model (penultimate layer, top 10%)") == (0.0, 1.0)
    assert colour_range("defense/aiv_target") is None


def test_data_filtering_answers_with_the_retrained_model_or_the_rejection() -> None:
    """Filtering the training set: the ASR of the model retrained on what was kept; filtering inputs
    (``mode: inference``): the ASR after rejection, like an input filter."""
    assert ActivationClustering().residual.record() == {
        "meaning": "ASR of the model retrained on the kept samples", "asr": "defense/asr", "cost": "defense/cad",
        "flagged": None, "aiv": None}
    assert ActivationClustering(mode="inference").residual == STRIP.residual
