"""``python -m bdlab.scan``: a population of tiny models scanned end to end (records, pictures, the same verdict
a single ``attack=given`` run gives), a rerun read from the cache, failures recorded while the scan goes on,
shards merged, bad input refused in one line; and the population figures on hand-built verdicts."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bdlab.compose import compose_config
from bdlab.defenses.model_inspection.base import InspectionResult, inspection_metrics
from bdlab.defenses.model_inspection.neural_cleanse import NeuralCleanse
from bdlab.errors import ConfigError
from bdlab.models.lenet import LeNet
from bdlab.models.weights import save_weights
from bdlab.pipeline import prepare
from bdlab.scan import cli, plan_scan
from bdlab.scanning import runner
from bdlab.scanning.manifest import ModelEntry, resolve_models
from bdlab.scanning.population import Verdict, detection_rates, population_metrics, roc_auc, roc_curve
from bdlab.scanning.progress import ScanProgress
from bdlab.scanning.scanners import build_scanner, inspector_options
from bdlab.services import weights_digest

TINY_DATA = ["dataset.channels=1", "dataset.size=12", "dataset.train_size=100", "dataset.test_size=100",
             "dataset.defense_fraction=0.3"]
NC = ["+scanner_args.neural_cleanse.epochs=2", "+scanner_args.neural_cleanse.optimisation_images=10",
      "+scanner_args.neural_cleanse.evaluation_images=10"]
HEADER = "name,weights,model,dataset,overrides,trojaned,target_class,attack,seed"
# three models: trojaned (target 3), clean, trojaned (target 1); the seed column is one the scan copies through
ROWS = [("m0", "1", "3", "badnets"), ("m1", "0", "", ""), ("m2", "1", "1", "blended")]


def manifest_line(name: str, weights: str, trojaned: str = "", target: str = "", attack: str = "",
                  model: str = "lenet", seed: str = "0") -> str:
    return f"{name},{weights},{model},synthetic,{' '.join(TINY_DATA)},{trojaned},{target},{attack},{seed}"


def write_manifest(folder: Path, lines: list[str], header: str = HEADER) -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Randomly initialised LeNets for 1x12x12 images, their manifest, and a cache the module's scans share."""
    folder = tmp_path_factory.mktemp("population")
    for seed in range(3):
        torch.manual_seed(seed)
        save_weights(LeNet(1, 10, (12, 12)), folder / "models" / f"m{seed}.safetensors")
    write_manifest(folder, [manifest_line(name, f"models/{name}.safetensors", trojaned, target, attack, seed=str(i))
                            for i, (name, trojaned, target, attack) in enumerate(ROWS)])
    return folder


def scan(argv: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch, cache: Path | None = None) -> None:
    """``python -m bdlab.scan <argv>`` in this process (Hydra leaves the session's logging alone)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    extra = [f"cache_dir={cache}"] if cache is not None else []
    monkeypatch.setattr(sys, "argv", ["bdlab.scan", *argv, *extra, f"hydra.run.dir={run_dir}",
                                      f"hydra.sweep.dir={run_dir}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    cli()


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def scanned(population: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The population scanned once by Neural Cleanse (2 epochs, 10 + 10 held-out images); the run directory."""
    run_dir = tmp_path_factory.mktemp("scan") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        scan([f"models={population / 'manifest.csv'}", *NC], run_dir, monkeypatch, population / "cache")
    return run_dir


def test_a_manifest_is_scanned_into_records_tables_and_pictures(scanned: Path, population: Path) -> None:
    found = rows(scanned / "scan.csv")
    assert [(r["name"], r["scanner"], r["status"]) for r in found] == \
        [(name, "neural_cleanse", "ok") for name, *_ in ROWS]
    # the manifest's ground truth and further columns are copied through
    assert [(r["trojaned"], r["target_class"], r["family"], r["seed"]) for r in found] == \
        [("1", "3", "badnets", "0"), ("0", "", "clean", "1"), ("1", "1", "blended", "2")]
    summary = json.loads((scanned / "scan.json").read_text())
    for record in summary["records"]:
        # the call is the AIV > 2 rule, and it is the same as "a class is flagged"
        assert record["called"] == int(record["aiv_max"] > 2.0) == int(bool(record["flagged_classes"]))
        assert record["seconds"] > 0 and record["cached"] is False
        if record["anomalous_class"] is not None:
            assert record["anomalous_score"] is not None
    figures = summary["population"]["neural_cleanse"]
    assert (figures["n_trojaned"], figures["n_clean"], figures["n_failed"], figures["n_unknown"]) == (2, 1, 0, 0)
    calls = {r["name"]: r["called"] for r in summary["records"]}
    assert figures["tpr"] == 50.0 * (calls["m0"] + calls["m2"])
    assert figures["fpr"] == 100.0 * calls["m1"]
    assert figures["accuracy"] == pytest.approx(100 * (calls["m0"] + calls["m2"] + 1 - calls["m1"]) / 3)
    assert summary["cached"]["neural_cleanse"] == {"cached": 0, "of": 3}
    assert summary["settings"]["neural_cleanse"]["epochs"] == 2
    for name in ("roc.png", "detection.png", "scan.md"):
        assert (scanned / name).stat().st_size > 0
    text = (scanned / "scan.md").read_text()
    assert "| neural_cleanse |" in text and "badnets (n=1)" in text and "clean (n=1)" in text


def test_a_scanned_model_gets_the_verdict_a_given_model_run_gives(scanned: Path, population: Path) -> None:
    """Loaded as ``python -m bdlab.run attack=given`` loads it, on the same held-out images, computed afresh (the
    test's own cache, not the scan's)."""
    experiment = prepare(compose_config([
        "attack=given", "model=lenet", "dataset=synthetic", *TINY_DATA, "logger=none", "defense=neural_cleanse",
        f"model.weights={population / 'models' / 'm2.safetensors'}", "defense.epochs=2",
        "defense.optimisation_images=10", "defense.evaluation_images=10"]))
    services = experiment.services
    result = experiment.defense.inspect(services.trojan_model(), services.data, services, services.trojan_key())
    record = next(r for r in json.loads((scanned / "scan.json").read_text())["records"] if r["name"] == "m2")
    assert record["aiv_max"] == pytest.approx(inspection_metrics(result, "")["aiv_max"])
    assert record["flagged_classes"] == result.flagged


def test_a_rerun_reads_every_inspection_from_the_cache(scanned: Path, population: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    def no_optimisation(*args, **kwargs):
        raise AssertionError("a cached model was inspected again")

    monkeypatch.setattr(NeuralCleanse, "score", no_optimisation)
    scan([f"models={population / 'manifest.csv'}", *NC], tmp_path / "again", monkeypatch, population / "cache")
    assert "neural_cleanse: 3 of 3 cached" in capsys.readouterr().out
    first, again = (json.loads((d / "scan.json").read_text())["records"] for d in (scanned, tmp_path / "again"))
    assert [r.pop("cached") for r in again] == [True] * 3
    # the running time is the one measured when the model was scanned
    assert again == [{k: v for k, v in r.items() if k != "cached"} for r in first]


def test_a_directory_takes_the_scan_options_and_has_no_ground_truth(
        scanned: Path, population: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Weights files with ``model=`` / ``dataset=`` and their fields: the same run config as the manifest's rows,
    so the same cache entries (every model cached; a glob is read by the same code)."""
    options = ["model=lenet", "dataset=synthetic", *TINY_DATA, *NC]
    scan([f"models={population / 'models'}", *options], tmp_path / "dir", monkeypatch, population / "cache")
    assert "neural_cleanse: 3 of 3 cached" in capsys.readouterr().out
    summary = json.loads((tmp_path / "dir" / "scan.json").read_text())
    assert [r["name"] for r in summary["records"]] == ["m0", "m1", "m2"]
    assert all(r["trojaned"] is None and r["target_flagged"] is None for r in summary["records"])
    figures = summary["population"]["neural_cleanse"]
    # without ground truth the rates are n/a (null), never 0; the verdicts and times are reported
    assert [figures[k] for k in ("accuracy", "tpr", "fpr", "auc", "target_flagged")] == [None] * 5
    assert figures["n_unknown"] == 3 and figures["mean_s"] > 0
    assert not (tmp_path / "dir" / "roc.png").exists() and not (tmp_path / "dir" / "detection.png").exists()


def test_shards_scan_their_share_and_merge_into_the_single_scan(scanned: Path, population: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``-m shard=0,1 shards=2`` (Hydra's basic launcher runs the jobs here, in turn): each job scans the models
    whose place is its shard modulo 2, and the multirun's end writes the single scan's outputs."""
    sweep = tmp_path / "sweep"
    scan(["-m", "shard=0,1", "shards=2", f"models={population / 'manifest.csv'}", *NC], sweep, monkeypatch,
         population / "cache")
    shares = {json.loads((sweep / str(job) / "scan.json").read_text())["shard"]:
              [r["name"] for r in rows(sweep / str(job) / "scan.csv")] for job in (0, 1)}
    assert shares == {0: ["m0", "m2"], 1: ["m1"]}
    merged, single = rows(sweep / "scan.csv"), rows(scanned / "scan.csv")
    assert [{k: v for k, v in r.items() if k != "cached"} for r in merged] == \
        [{k: v for k, v in r.items() if k != "cached"} for r in single]
    assert json.loads((sweep / "scan.json").read_text())["population"] == \
        json.loads((scanned / "scan.json").read_text())["population"]
    assert (sweep / "roc.png").is_file() and (sweep / "detection.png").is_file()


def test_a_model_that_fails_is_recorded_and_the_scan_goes_on(population: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """m1's inspection raises; m2's weights file turns bad after the checks (mid-scan). Two models at a time: the
    failing chunk is retried one model at a time, so m0 is still scanned."""
    folder = tmp_path / "population"
    (folder / "models").mkdir(parents=True)
    for name, *_ in ROWS:
        (folder / "models" / f"{name}.safetensors").write_bytes(
            (population / "models" / f"{name}.safetensors").read_bytes())
    write_manifest(folder, [manifest_line(name, f"models/{name}.safetensors", trojaned, target, attack)
                            for name, trojaned, target, attack in ROWS])
    bad_key, chunks = weights_digest(str(folder / "models" / "m1.safetensors")), []
    inspect_many = NeuralCleanse.inspect_many

    def failing_on_m1(self, models, data, services, keys):
        chunks.append(len(models))
        if bad_key in keys:
            raise RuntimeError("inspection exploded")
        return inspect_many(self, models, data, services, keys)

    prepare_groups = runner.prepare_groups

    def then_corrupt_m2(*args, **kwargs):
        groups = prepare_groups(*args, **kwargs)
        (folder / "models" / "m2.safetensors").write_bytes(b"not weights any more")
        return groups

    monkeypatch.setattr(NeuralCleanse, "inspect_many", failing_on_m1)
    monkeypatch.setattr("bdlab.scan.prepare_groups", then_corrupt_m2)
    scan([f"models={folder / 'manifest.csv'}", "batch_models=2", *NC], tmp_path / "run", monkeypatch,
         population / "cache")
    summary = json.loads((tmp_path / "run" / "scan.json").read_text())
    status = {r["name"]: (r["status"], r["error"]) for r in summary["records"]}
    assert status["m0"] == ("ok", "")
    assert status["m1"] == ("failed", "RuntimeError: inspection exploded")
    assert status["m2"][0] == "failed" and "not a safetensors file" in status["m2"][1]
    assert chunks == [2, 1, 1]  # m0 and m1 together, then each alone; m2 never reached a scanner
    failed = next(r for r in summary["records"] if r["name"] == "m1")
    assert failed["aiv_max"] is None and failed["called"] is None
    figures = summary["population"]["neural_cleanse"]
    assert (figures["n_failed"], figures["n_trojaned"], figures["n_clean"]) == (2, 1, 0)
    assert figures["fpr"] is None and figures["auc"] is None  # no clean model left to measure them on
    assert "inspection exploded" in (tmp_path / "run" / "scan.md").read_text()


# ---- bad input: one line naming the entry or field, exit 2, nothing written

def bad_manifests(folder: Path, weights: Path) -> dict[str, list[str]]:
    """The scan's arguments for each mistake of the issue's list (by name)."""
    good = manifest_line("good", str(weights))
    other = save_weights(nn.Linear(3, 2), folder / "linear.safetensors")
    cases = {
        "missing_file": [good, manifest_line("lost", str(folder / "nowhere.safetensors"))],
        "architecture": [good, manifest_line("linear", str(other))],
        "target": [good, manifest_line("far", str(weights), "1", "12", "badnets")],
    }
    arguments = {}
    for name, lines in cases.items():
        (folder / name).mkdir()
        arguments[name] = [f"models={write_manifest(folder / name, lines)}"]
    (folder / "columns").mkdir()
    arguments["columns"] = [f"models={write_manifest(folder / 'columns', ['x,' + str(weights)], 'name,weights')}"]
    (folder / "empty").mkdir()
    arguments["empty"] = [f"models={folder / 'empty'}"]
    arguments["glob"] = [f"models={folder}/*.nothing"]
    return arguments


BAD = [
    ("missing_file", [], "models[lost].weights", "no file at"),
    ("architecture", [], "models[linear].weights", "the file's keys do not match LeNet: missing conv1.bias"),
    ("columns", [], "models", "lacks the column(s) model, dataset"),
    ("target", [], "models[far].target_class", "got 12, must be in [0, 9]"),
    ("empty", [], "models", "holds no weights file"),
    ("glob", [], "models", "holds no weights file"),
    ("missing_file", ["scanners=[nosuch]"], "scanners", "no scanner 'nosuch'; valid: "),
    ("missing_file", ["scanners=[neural_cleanse,strip]"], "scanners", "strip is not a model inspector"),
    ("target", ["++scanner_args.neural_cleanse.optimisation_images=500"],
     "scanner_args.neural_cleanse.optimisation_images", "the held-out split has 30"),
]


@pytest.mark.parametrize("case, overrides, field, words", BAD,
                         ids=[f"{c[0]}-{' '.join(c[1])}" if c[1] else str(c[0]) for c in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, overrides: list[str], field: str, words: str,
                                                         population: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    arguments = bad_manifests(tmp_path, population / "models" / "m0.safetensors")
    with pytest.raises(SystemExit) as stop:
        scan([*arguments[case], *NC, *overrides], tmp_path / "run", monkeypatch, tmp_path / "cache")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"bdlab: invalid config: {field}: ") and words in lines[0], lines[0]
    assert not list((tmp_path / "run").glob("scan*")) and not list((tmp_path / "run").glob("*.png"))
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    if "valid: " in words:  # an unknown scanner's line lists every model inspector, and nothing else
        assert lines[0].split("valid: ")[1] == ", ".join(inspector_options())
        assert {"neural_cleanse", "tabor", "k_arm", "pixel", "abs", "df_tnd", "deep_inspect", "neuron_inspect",
                "uap", "cw_l0"} <= set(inspector_options()) and "strip" not in inspector_options()


MANIFEST_MISTAKES = [
    ([manifest_line("vague", "{w}", "maybe")], "models[vague].trojaned", "write 1 (trojaned), 0 (clean)"),
    ([manifest_line("clean_but", "{w}", "0", "2")], "models[clean_but].target_class", "for a clean model"),
    ([manifest_line("odd", "{w}", "1", "two")], "models[odd].target_class", "an integer"),
    ([manifest_line("twice", "{w}"), manifest_line("twice", "{w}")], "models[twice]", "appears twice"),
    ([manifest_line("", "{w}")], "models[row 2].name", "is empty"),
    ([manifest_line("q", "{w}").replace(TINY_DATA[0], "'dataset.size=8")], "models[q].overrides", "cannot split"),
]


@pytest.mark.parametrize("lines, field, words", MANIFEST_MISTAKES, ids=[c[1] for c in MANIFEST_MISTAKES])
def test_manifest_mistakes_name_their_row(lines: list[str], field: str, words: str, population: Path,
                                          tmp_path: Path) -> None:
    weights = population / "models" / "m0.safetensors"
    path = write_manifest(tmp_path, [line.replace("{w}", str(weights)) for line in lines])
    with pytest.raises(ConfigError) as error:
        resolve_models(str(path), "lenet", "mnist", ())
    assert error.value.field == field and words in error.value.message, str(error.value)


def test_a_directory_with_a_manifest_reads_it_and_a_glob_names_models_by_file(population: Path) -> None:
    assert [e.name for e in resolve_models(str(population), "x", "y", ())] == ["m0", "m1", "m2"]
    found = resolve_models(f"{population}/models/m[12].safetensors", "lenet", "synthetic", ("dataset.size=12",))
    assert [(e.name, e.model, e.dataset, e.overrides, e.trojaned) for e in found] == \
        [("m1", "lenet", "synthetic", ("dataset.size=12",), None), ("m2", "lenet", "synthetic", ("dataset.size=12",),
                                                                     None)]


def test_scan_settings_and_scanner_mistakes_are_named(population: Path, tmp_path: Path) -> None:
    def refused(*overrides: str) -> ConfigError:
        cfg = compose_config([f"models={population}", *overrides], config_name="scan")
        with pytest.raises(ConfigError) as error:
            plan_scan(cfg, {"model": "lenet", "dataset": "synthetic"}, [], tmp_path)
        return error.value

    assert refused("shard=2", "shards=2").field == "shard"
    assert refused("batch_models=0").field == "batch_models"
    assert refused("+scanner_args.tabor.epochs=2").field == "scanner_args.tabor"
    assert refused("scanners=[neural_cleanse,neural_cleanse]").field == "scanners"
    missing = compose_config([], config_name="scan")
    with pytest.raises(ConfigError, match="models: give the models to scan"):
        plan_scan(missing, {}, [], tmp_path)
    with pytest.raises(ConfigError) as error:
        build_scanner(compose_config(["defense=neural_cleanse"]), "neural_cleanse", {"epoks": 2})
    assert error.value.field == "scanner_args.neural_cleanse.epoks" and "no such field" in error.value.message


def test_an_unknown_option_in_a_row_is_named_with_the_row(population: Path) -> None:
    entry = ModelEntry(0, "odd", population / "models" / "m0.safetensors", "lenet5", "synthetic", tuple(TINY_DATA))
    settings = runner.ScanSettings(0, str(population / "cache"), "data")
    with pytest.raises(ConfigError) as error:
        runner.prepare_groups([entry], ["neural_cleanse"], {}, settings)
    assert error.value.field == "models[odd].model" and "no option 'lenet5'" in error.value.message


# ---- the population figures, on hand-built verdicts

def verdicts(trojaned: list[float], clean: list[float], **common) -> list[Verdict]:
    """Verdicts of NC's rule: class 0 flagged where the AIV is above 2."""
    def flags(aiv: float) -> list[int]:
        return [0] if aiv > 2 else []
    return [Verdict(f"t{i}", "nc", aiv_max=a, flagged_classes=flags(a), trojaned=True, **common)
            for i, a in enumerate(trojaned)] + \
        [Verdict(f"c{i}", "nc", aiv_max=a, flagged_classes=flags(a), trojaned=False, **common)
         for i, a in enumerate(clean)]


def test_population_figures_on_hand_built_verdicts() -> None:
    found = verdicts([3, 3, 1, 5], [0.5, 2.5, 1, 1])
    figures = population_metrics(found)
    # called: 3 of 4 trojaned (AIV > 2), 1 of 4 clean (2.5) -> 6 of 8 right
    assert (figures["accuracy"], figures["tpr"], figures["fpr"]) == (75.0, 75.0, 25.0)
    # AUC: of the 16 (trojaned, clean) pairs the trojaned model scores higher in 13, ties (1 vs 1, 1 vs 1) count
    # half: (4 + 4 + (1 + 0.5 + 0.5) + 4) / 16 = 14 / 16
    assert figures["auc"] == pytest.approx(14 / 16)
    # a scanner that ranks the other way round: the complement, not the same figure
    flipped = population_metrics(verdicts([0.5, 2.5, 1, 1], [3, 3, 1, 5]))
    assert flipped["auc"] == pytest.approx(2 / 16) and flipped["tpr"] == 25.0 and flipped["fpr"] == 75.0
    assert (figures["n_trojaned"], figures["n_clean"], figures["n_failed"], figures["n_unknown"]) == (4, 4, 0, 0)
    fpr, tpr = roc_curve(found)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and (0.0, 0.75) in set(zip(fpr, tpr))


def test_failed_scans_are_counted_and_left_out_of_the_rates() -> None:
    found = verdicts([3, 1], [0.5, 2.5])
    broken = [Verdict("t9", "nc", status="failed", error="boom", trojaned=True),
              Verdict("c9", "nc", status="failed", error="boom", trojaned=False)]
    figures, with_failures = population_metrics(found), population_metrics(found + broken)
    assert with_failures["n_failed"] == 2 and with_failures["n_models"] == 6
    for key in ("accuracy", "tpr", "fpr", "auc", "n_trojaned", "n_clean"):
        assert with_failures[key] == figures[key], key


def test_figures_without_the_models_they_need_are_nan() -> None:
    only_trojaned = population_metrics(verdicts([3, 1], []))
    assert only_trojaned["tpr"] == 50.0 and math.isnan(only_trojaned["fpr"]) and math.isnan(only_trojaned["auc"])
    unknown = population_metrics([Verdict("u", "nc", aiv_max=3.0, seconds=1.0)])
    assert all(math.isnan(unknown[k]) for k in ("accuracy", "tpr", "fpr", "auc", "target_flagged"))
    assert unknown["n_unknown"] == 1 and unknown["mean_s"] == 1.0
    assert math.isnan(population_metrics([])["mean_s"]) and math.isnan(population_metrics([])["models_per_hour"])


def test_target_share_seconds_and_throughput() -> None:
    found = [Verdict("a", "nc", aiv_max=3, flagged_classes=[2], trojaned=True, target_class=2, seconds=1.0),
             Verdict("b", "nc", aiv_max=3, flagged_classes=[4], trojaned=True, target_class=2, seconds=2.0),
             Verdict("c", "nc", aiv_max=1, flagged_classes=[], trojaned=True, target_class=None, seconds=6.0),
             Verdict("d", "nc", aiv_max=1, trojaned=False, seconds=3.0, status="failed")]
    figures = population_metrics(found)
    # of the trojaned models with a known target (a, b), a's target is flagged; b flags another class
    assert figures["target_flagged"] == 50.0
    assert (figures["mean_s"], figures["median_s"], figures["models_per_hour"]) == (3.0, 2.0, 1200.0)


def test_a_verdict_carries_the_true_targets_signed_aiv() -> None:
    """The target's AIV is positive on the suspicious side, negative off it (its trigger larger than the median),
    NaN for a clean model: a scanner that flags another class still shows how close it came to the target."""
    scores = torch.tensor([10.0, 10.0, 10.0, 11.0, 9.0, 10.0, 10.0, 2.0, 10.0, 30.0])  # class 7 small, 9 large
    aiv = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 4.0, 0.0, 10.0])
    result = InspectionResult(scores=scores, suspicious="low", aiv=aiv, flagged=[7], seconds=1.5)

    def entry(trojaned: bool | None, target: int | None) -> ModelEntry:
        return ModelEntry(0, "m", Path("m.safetensors"), "lenet", "mnist", trojaned=trojaned, target_class=target)

    inspector = NeuralCleanse()
    assert runner.verdict_of(entry(True, 7), "nc", inspector, result, None).target_aiv == 4.0
    assert runner.verdict_of(entry(True, 9), "nc", inspector, result, None).target_aiv == -10.0
    assert math.isnan(runner.verdict_of(entry(False, None), "nc", inspector, result, None).target_aiv)
    assert math.isnan(runner.verdict_of(entry(None, None), "nc", inspector, result, None).target_aiv)


def scored_population(side: str, trojaned: list[float], clean: list[float]) -> list[Verdict]:
    """Verdicts with only their most suspicious score (``top_score``) on the scanner's ``side``."""
    return [Verdict(f"t{i}", "s", top_score=x, suspicious=side, trojaned=True) for i, x in enumerate(trojaned)] + \
        [Verdict(f"c{i}", "s", top_score=x, suspicious=side, trojaned=False) for i, x in enumerate(clean)]


def test_the_score_auc_ranks_the_most_suspicious_score_across_models() -> None:
    """score_auc ranks models by their most suspicious class's own score: a small trigger on the low side, a high
    REASR on the high side; a two-sided scanner has no direction (n/a), and one undefined score makes it n/a."""
    # in 3 + 3 + 1 of the 9 (trojaned, clean) pairs the trojaned model's trigger is the smaller
    small_triggers = scored_population("low", [5, 8, 30], [20, 25, 40])
    assert population_metrics(small_triggers)["score_auc"] == pytest.approx(7 / 9)
    assert population_metrics(scored_population("high", [5, 8, 30], [20, 25, 40]))["score_auc"] == pytest.approx(2 / 9)
    assert math.isnan(population_metrics(scored_population("both", [5, 8, 30], [20, 25, 40]))["score_auc"])
    assert math.isnan(roc_auc(small_triggers + [Verdict("x", "s", suspicious="low", trojaned=False)], by="score"))
    fpr, tpr = roc_curve(small_triggers, by="score")
    assert any(f == 0.0 and t == pytest.approx(2 / 3) for f, t in zip(fpr, tpr))  # the 2 smallest are trojaned
    assert math.isnan(population_metrics(small_triggers)["auc"])  # aiv_max unset: NaN, not mixed up


def test_the_score_accuracy_is_calibrated_leave_one_out() -> None:
    """Each model is judged by the threshold best on the others: separable scores give 100%, scores on the wrong
    side 0% (a learned rule cannot invert them), and an overlap costs more than an in-sample threshold would."""
    assert population_metrics(scored_population("low", [1, 2, 3], [10, 11, 12]))["score_accuracy"] == 100.0
    assert population_metrics(scored_population("high", [1, 2, 3], [10, 11, 12]))["score_accuracy"] == 0.0
    # sizes 1T 2T 3T 10C 11T 12C 15C 16C: in-sample "size < 6.5" is right on 7 of 8. Left out, 11T meets
    # "< 6.5", 10C "< 11.5", 12C "< 13" (a tie broken towards calling more trojaned); the rest are right: 5 of 8
    overlap = scored_population("low", [1, 2, 3, 11], [10, 12, 15, 16])
    assert population_metrics(overlap)["score_accuracy"] == 62.5
    assert math.isnan(population_metrics(scored_population("both", [1, 2], [3, 4]))["score_accuracy"])
    assert math.isnan(population_metrics(scored_population("low", [1, 2], []))["score_accuracy"])


def test_a_model_is_called_trojaned_only_when_the_scanner_flags_a_class() -> None:
    """ABS's REASR criterion can leave a model with AIV above 2 unflagged: it is called clean, not trojaned."""
    unflagged = [Verdict("t", "abs", aiv_max=7.5, flagged_classes=[], trojaned=True, family="badnets"),
                 Verdict("c", "abs", aiv_max=13.5, flagged_classes=[], trojaned=False, family="clean"),
                 Verdict("c2", "abs", aiv_max=0.7, flagged_classes=[], trojaned=False, family="clean")]
    figures = population_metrics(unflagged)
    assert (figures["tpr"], figures["fpr"]) == (0.0, 0.0)
    assert figures["auc"] == pytest.approx(0.5)  # still ranked by aiv_max: 7.5 beats 0.7, loses to 13.5
    assert detection_rates(unflagged) == {"badnets": 0.0, "clean": 0.0}


def test_huge_and_infinite_anomaly_indices_keep_their_order() -> None:
    """AIVs far above the sigmoid's range (and an infinite one, MAD 0) still rank as they are."""
    assert roc_auc(verdicts([math.inf, 40], [30, 35])) == 1.0
    assert roc_auc(verdicts([30, 35], [math.inf, 40])) == 0.0


def test_detection_rates_by_family() -> None:
    found = [Verdict("a", "nc", aiv_max=3, flagged_classes=[1], trojaned=True, family="badnets"),
             Verdict("b", "nc", aiv_max=1, trojaned=True, family="badnets"),
             Verdict("c", "nc", aiv_max=5, flagged_classes=[1], trojaned=True, family="wanet"),
             Verdict("d", "nc", aiv_max=2.5, flagged_classes=[1], trojaned=False),
             Verdict("e", "nc", aiv_max=0.5, trojaned=False, family="clean"),
             Verdict("f", "nc", aiv_max=9, flagged_classes=[1], trojaned=None, family="badnets")]  # unknown truth
    assert detection_rates(found) == {"badnets": 50.0, "wanet": 100.0, "clean": 50.0}


def test_progress_is_one_line_per_model_scan_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    progress = ScanProgress(2, terminal=False)
    with caplog.at_level(logging.INFO, logger="bdlab"):
        progress.update(Verdict("m0", "nc", aiv_max=2.5, flagged_classes=[3], seconds=1.0))
        progress.update(Verdict("m1", "nc", status="failed", error="RuntimeError: boom"))
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "bdlab"]
    assert len(lines) == 2 and lines[0].startswith("scan 1/2: m0 by nc: flagged 3, aiv_max 2.50")
    assert "left" in lines[0] and lines[1].startswith("scan 2/2: m1 by nc: failed (RuntimeError: boom)")


def test_bench_scan_reads_a_zoo_manifest_and_checks_its_arguments(population: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bdlab.bench scan --manifest``: the manifest's first models scanned one at a time and batched,
    with the same verdicts; too many models or a scanner that is not one: one line, exit 2, no table."""
    from bdlab import bench

    nc = ["defense.epochs=2", "defense.optimisation_images=10", "defense.evaluation_images=10",
          f"cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "scan.md"
    manifest = str(population / "manifest.csv")
    assert bench.main(["scan", *nc, "--manifest", manifest, "--models", "2", "--scanners", "neural_cleanse",
                       "--out", str(out)]) == 0
    table = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| neural_cleanse")]
    assert [cells[3].strip() for cells in table] == ["one at a time", "batched"]
    assert all(cells[2].strip() == "2" and cells[8].strip() == "yes" for cells in table)
    assert f"the first 2 models of {manifest}" in out.read_text()
    assert f"--manifest {manifest} --models 2 --scanners neural_cleanse" in out.read_text()  # the command, whole
    for argv, words in [(["--models", "4", "--scanners", "neural_cleanse"], "has 3 models"),
                        (["--models", "2", "--scanners", "strip"], "not a model inspector")]:
        bad = tmp_path / "bad.md"
        assert bench.main(["scan", *nc, "--manifest", manifest, *argv, "--out", str(bad)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("bdlab: invalid config: --") and words in error[0]
        assert not bad.exists()
