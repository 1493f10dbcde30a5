"""``python -m bdlab.report``: every table cell is the matching results.json metric; bad input is
one line per problem; nothing useful to report is a non-zero exit."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bdlab.report import main as report_main
from bdlab.reporting.tables import slug
from bdlab.results import RESULTS_FORMAT, show_value

# the session-wide tiny_sweep fixture, shared with the other sweep tests (one run for all)
pytest_plugins = ["tests.sweep_helpers"]


def write_result(path: Path, attack: str = "badnets", defense: str = "none", seed: int = 0,
                 metrics: dict[str, float] | None = None, status: str = "ok", **attack_params: Any) -> Path:
    """A results.json as bdlab.run writes it, reduced to what the report reads."""
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": RESULTS_FORMAT, "status": status, "dataset": "mnist", "model": "lenet", "attack": attack,
               "defense": defense, "seed": seed, "metrics": metrics or {},
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
        setting = f"synthetic / lenet (model.batch_size={run['config']['model']['batch_size']})"
        assert [key for key, _ in run["headline"]][:3] == ["trojan/acc", "trojan/asr", "attack/cad"] or \
            run["attack"] == "none"
        for metric, _ in run["headline"]:
            table = tmp_path / "report" / "tables" / f"{slug(setting)}__{slug(metric)}.csv"
            if metric not in run["metrics"]:
                continue
            mean, std = read_table(table)[run["attack"], run["defense"]]
            assert float(mean) == run["metrics"][metric] and float(std) == 0.0, (path, metric)
            assert (tmp_path / "report" / "heatmaps" / table.with_suffix(".png").name).is_file()
            checked += 1
    assert checked >= 6 * 3  # trojan/acc, trojan/asr, attack/cad at least, in the six successful cells
    assert "**failed**" in markdown and markdown.count("- failed: synthetic / lenet (model.batch_size=0)") == 6
    assert "model.batch_size: got 0, must be >= 1" in markdown
    long_rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert {row["metric"] for row in long_rows} >= {"clean/acc", "trojan/tmc", "defense/ard"}


def test_mean_and_std_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for seed, asr in enumerate([90.0, 92.0, 97.0]):
        write_result(tmp_path / f"run{seed}", seed=seed, metrics={"trojan/asr": asr})
    write_result(tmp_path / "run3", seed=3, status="failed")
    assert report_main([str(tmp_path)]) == 0
    assert "| badnets | 93.00 ± 3.61 (1 failed) |" in capsys.readouterr().out
    mean, std = read_table(tmp_path / "report" / "tables" / "mnist_lenet__trojan_asr.csv")["badnets", "none"]
    assert float(mean) == pytest.approx(93.0) and float(std) == pytest.approx(math.sqrt(13.0))


def test_a_metric_that_does_not_apply_reads_n_a(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """NaN (the run says the metric does not apply) and an absent key read "n/a", never 0 or blank; a cell
    with no run at all reads "missing"."""
    write_result(tmp_path / "a", defense="neural_cleanse", metrics={"defense/mjs": 0.5})
    write_result(tmp_path / "b", attack="wanet", defense="neural_cleanse", metrics={"defense/mjs": math.nan})
    write_result(tmp_path / "c", attack="wanet", defense="strip", metrics={"defense/tpr": 80.0})
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| badnets | 0.50 | missing |" in out and "| wanet | n/a | n/a |" in out
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
    assert "| badnets (poison_rate=0.05) | 90.00 |" in out
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
