"""The model zoo (``python -m bdlab.zoo``): a 3 + 3 zoo on tiny synthetic data built end to end, its manifest and
weights read back the way a scan reads them, reproducibility from the seed, reuse through the cache, a failed
model recorded and left out, sharding, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

import bdlab.services
from bdlab.compose import compose_config
from bdlab.evaluate import evaluate
from bdlab.pipeline import prepare
from bdlab.zoo import COLUMNS, cli
from bdlab.zoo_specs import CLEAN, TROJAN, Design, ImageShape, hydra_value, shard_of

# 12x12 RGB gratings (LeNet's smallest input), one epoch; the cheapest families
TINY = ["dataset=synthetic", "dataset.size=12", "dataset.train_size=200", "dataset.test_size=100", "model=lenet",
        "trainer.max_epochs=1", "families=[badnets,blended]"]
LOADING = "dataset.size=12 dataset.train_size=200 dataset.test_size=100"


def run_zoo(argv: list[str], hydra_dir: Path) -> tuple[object, list[str]]:
    """``python -m bdlab.zoo <argv>`` in this process: its exit code and the models it trained (by fit call)."""
    trained: list[str] = []
    fit, fit_classifier = bdlab.services.fit, bdlab.services.fit_classifier

    def counted_fit(*args, **kwargs):
        trained.append("trojan")
        return fit(*args, **kwargs)

    def counted_fit_classifier(*args, **kwargs):
        trained.append("clean")
        return fit_classifier(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bdlab.services, "fit", counted_fit)
        patch.setattr(bdlab.services, "fit_classifier", counted_fit_classifier)
        patch.setattr(sys, "argv", ["bdlab.zoo", *argv, f"hydra.run.dir={hydra_dir}", "hydra.output_subdir=null",
                                    "hydra/job_logging=none", "hydra/hydra_logging=none"])
        try:
            cli()
            code: object = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, trained


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def record(out: Path) -> dict:
    return json.loads((out / "zoo.json").read_text())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 3 + 3 zoo (seed 0) in its own cache, and the fits it took."""
    root = tmp_path_factory.mktemp("zoo")
    cache = root / "cache"
    code, trained = run_zoo([*TINY, "trojaned=3", "clean=3", "seed=0", f"out={root / 'z33'}", f"cache_dir={cache}"],
                            root / "hydra")
    assert code == 0
    return SimpleNamespace(root=root, cache=cache, out=root / "z33", trained=trained)


def test_the_zoo_writes_a_manifest_weights_and_its_record(zoo: SimpleNamespace) -> None:
    assert Counter(zoo.trained) == {"trojan": 3, "clean": 3}
    rows = manifest(zoo.out)
    assert list(rows[0])[:len(COLUMNS)] == list(COLUMNS)
    assert list(rows[0])[-3:] == ["acc", "asr", "train_s"]
    assert [row["name"] for row in rows] == ["trojan-000", "clean-000", "trojan-001", "clean-001", "trojan-002",
                                             "clean-002"]
    assert {(row["model"], row["dataset"], row["overrides"], row["epochs"]) for row in rows} == \
        {("lenet", "synthetic", LOADING, "1")}
    for row in rows:
        assert (zoo.out / row["weights"]).is_file()
        assert 0 <= float(row["acc"]) <= 100 and float(row["train_s"]) > 0
        assert float(row["lr"]) in (0.02, 0.05, 0.1) and int(row["batch_size"]) in (64, 128)
    saved = record(zoo.out)
    assert saved["counts"] == {"models": 6, "trained": 6, "failed": 0}
    assert [model["status"] for model in saved["models"]] == ["ok"] * 6
    assert saved["config"]["families"] == ["badnets", "blended"] and saved["manifest_overrides"] == LOADING.split()
    assert not (zoo.out / "shards").exists()


def test_the_ground_truth_is_the_specs(zoo: SimpleNamespace) -> None:
    rows = {row["name"]: row for row in manifest(zoo.out)}
    models = {model["name"]: model for model in record(zoo.out)["models"]}
    for name, row in rows.items():
        spec = models[name]
        if spec["kind"] == TROJAN:
            assert row["trojaned"] == "1" and row["attack"] == row["family"] == spec["family"]
            assert int(row["target_class"]) == spec["attack"]["target_class"] and 0 <= int(row["target_class"]) < 10
            rate = float(row["poison_rate"])
            assert rate == spec["attack"]["poison_rate"] and 0.05 <= rate <= 0.2
            assert float(row["alpha"]) == spec["attack"]["alpha"] and 0 <= float(row["asr"]) <= 100
            assert f"attack={spec['family']}" in spec["overrides"]
        else:
            assert row["trojaned"] == "0" and row["family"] == CLEAN
            # a clean model has no target, no trigger and so no ASR: n/a (empty), never 0
            assert row["target_class"] == row["attack"] == row["poison_rate"] == row["asr"] == row["alpha"] == ""
            assert "attack=none" in spec["overrides"]
        assert int(row["seed"]) == spec["seed"] and f"seed={spec['seed']}" in spec["overrides"]
    # families come round-robin from a seeded order: two of one, one of the other
    assert sorted(Counter(row["family"] for row in rows.values() if row["trojaned"] == "1").values()) == [1, 2]
    badnets = [row for row in rows.values() if row["family"] == "badnets"]
    for row in badnets:
        size, (top, left) = int(row["patch_size"]), json.loads(row["position"])
        assert 3 <= size <= 6 and 0 <= top <= 12 - size and 0 <= left <= 12 - size
        assert len(json.loads(row["color"])) == 3  # RGB on 3-channel data


def given_run(out: Path, row: dict[str, str], cache: Path, *extra: str):
    """The run a scan makes of a manifest row: ``attack=given model=<model> dataset=<dataset> model.weights=...``."""
    return prepare(compose_config(["attack=given", f"model={row['model']}", f"dataset={row['dataset']}",
                                   f"model.weights={out / row['weights']}", *row["overrides"].split(), "logger=none",
                                   f"cache_dir={cache}", *extra])).services


def test_the_weights_load_back_and_reproduce_the_figures(zoo: SimpleNamespace) -> None:
    rows = manifest(zoo.out)
    for row in rows:
        services = given_run(zoo.out, row, zoo.cache)
        model = services.trojan_model()
        assert evaluate(model, services.data.test, None, 0).acc == pytest.approx(float(row["acc"]), abs=1e-6)
    # the ASR is the trojaned model's on its own trigger: restamped from the manifest's fields, it agrees
    row = next(row for row in rows if row["family"] == "badnets")
    fields = {"patch_size": int(row["patch_size"]), "position": json.loads(row["position"]),
              "color": json.loads(row["color"]), "alpha": float(row["alpha"])}
    services = given_run(zoo.out, row, zoo.cache, "attack.trigger=badnets",
                         f"attack.target_class={row['target_class']}",
                         *(f"+attack.trigger_args.{key}={hydra_value(value)}" for key, value in fields.items()))
    poisoned = services.attack.poison_test(services.data.test)
    asr = evaluate(services.trojan_model(), None, poisoned, int(row["target_class"])).asr
    assert asr == pytest.approx(float(row["asr"]), abs=1e-6)


def test_the_zoo_is_scanned_end_to_end_and_a_rerun_scans_nothing(zoo: SimpleNamespace, tmp_path: Path) -> None:
    """The 3 + 3 zoo's manifest, as written, scanned by Neural Cleanse: one verdict per model with its ground truth,
    the population figures over all six, and a second scan reading every inspection from the cache."""
    import bdlab.scan

    nc = ["scanners=[neural_cleanse]", "+scanner_args.neural_cleanse.epochs=2",
          "+scanner_args.neural_cleanse.optimisation_images=3", "+scanner_args.neural_cleanse.evaluation_images=2"]

    def scan(run_dir: Path) -> dict:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["bdlab.scan", f"models={zoo.out / 'manifest.csv'}", *nc,
                                        f"cache_dir={zoo.cache}", f"hydra.run.dir={run_dir}",
                                        "hydra/job_logging=none", "hydra/hydra_logging=none"])
            bdlab.scan.cli()
        return json.loads((run_dir / "scan.json").read_text())

    first = scan(tmp_path / "first")
    truth = {row["name"]: row for row in manifest(zoo.out)}
    records = first["records"]
    assert sorted(r["name"] for r in records) == sorted(truth) and {r["status"] for r in records} == {"ok"}
    for r in records:
        assert str(r["trojaned"]) == truth[r["name"]]["trojaned"] and r["family"] == truth[r["name"]]["family"]
        assert r["called"] == bool(r["flagged_classes"]) and r["cached"] is False
    figures = first["population"]["neural_cleanse"]
    assert (figures["n_models"], figures["n_trojaned"], figures["n_clean"], figures["n_failed"]) == (6, 3, 3, 0)
    called = {r["name"]: r["called"] for r in records}
    right = sum(called[name] == (row["trojaned"] == "1") for name, row in truth.items())
    assert figures["accuracy"] == pytest.approx(100 * right / 6)
    assert (tmp_path / "first" / "roc.png").is_file()
    again = scan(tmp_path / "again")
    assert all(r["cached"] for r in again["records"])
    assert [(r["name"], r["flagged_classes"], r["aiv_max"]) for r in again["records"]] == \
        [(r["name"], r["flagged_classes"], r["aiv_max"]) for r in records]


def test_a_smaller_zoo_is_the_first_models_and_trains_nothing(zoo: SimpleNamespace) -> None:
    out = zoo.root / "z22"
    code, trained = run_zoo([*TINY, "trojaned=2", "clean=2", "seed=0", f"out={out}", f"cache_dir={zoo.cache}"],
                            zoo.root / "hydra")
    assert code == 0 and trained == []
    assert record(out)["counts"] == {"models": 4, "trained": 0, "failed": 0}
    larger = {row["name"]: row for row in manifest(zoo.out)}
    rows = manifest(out)
    assert [row["name"] for row in rows] == ["trojan-000", "clean-000", "trojan-001", "clean-001"]
    for row in rows:
        assert row == larger[row["name"]]  # the train seconds too: kept in the cache with the model
        assert (out / row["weights"]).read_bytes() == (zoo.out / row["weights"]).read_bytes()


def test_a_shard_job_trains_its_share_and_leaves_the_manifest_to_the_plain_run(zoo: SimpleNamespace) -> None:
    out = zoo.root / "sharded"
    code, trained = run_zoo([*TINY, "trojaned=2", "clean=2", "seed=0", "shard=1", "shards=2", f"out={out}",
                             f"cache_dir={zoo.cache}"], zoo.root / "hydra")
    assert code == 0 and trained == []
    share = json.loads((out / "shards" / "1-of-2.json").read_text())
    names = {model["name"] for model in share["models"]}
    assert 0 < len(names) < 4 and not (out / "manifest.csv").exists() and not (out / "models").exists()
    rows = {row["name"]: row for row in manifest(zoo.out)}
    for model in share["models"]:
        assert model["acc"] == pytest.approx(float(rows[model["name"]]["acc"]))


@pytest.mark.slow
def test_joblib_jobs_train_the_shares_and_the_plain_run_writes_the_manifest(tmp_path: Path) -> None:
    out, cache = tmp_path / "zoo", tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "bdlab.zoo", "-m", "shard=0,1", "shards=2", "hydra/launcher=joblib",
                           *TINY, "trojaned=2", "clean=2", f"out={out}", f"cache_dir={cache}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [{m["name"] for m in json.loads((out / "shards" / f"{k}-of-2.json").read_text())["models"]}
              for k in (0, 1)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == {"trojan-000", "trojan-001", "clean-000", "clean-001"}
    assert not (out / "manifest.csv").exists()
    code, trained = run_zoo([*TINY, "trojaned=2", "clean=2", f"out={out}", f"cache_dir={cache}"], tmp_path / "hydra")
    assert code == 0 and trained == [] and len(manifest(out)) == 4


def test_a_model_that_fails_is_recorded_and_left_out(zoo: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bdlab.services.RunServices, "trojan_model", broken)
    out = zoo.root / "failed"
    code, _ = run_zoo([*TINY, "trojaned=1", "clean=1", "seed=0", f"out={out}", f"cache_dir={zoo.cache}"],
                      zoo.root / "hydra")
    assert code == 0
    assert [row["name"] for row in manifest(out)] == ["clean-000"]
    failed = [model for model in record(out)["models"] if model["status"] == "failed"]
    assert [model["name"] for model in failed] == ["trojan-000"]
    assert failed[0]["error"]["type"] == "RuntimeError" and "simulated" in failed[0]["error"]["message"]
    assert record(out)["counts"]["failed"] == 1 and not (out / "models" / "trojan-000.safetensors").exists()


DESIGN = dict(families=["badnets", "blended", "targeted", "wanet"], poison_rate=[0.05, 0.2],
              triggers={"badnets": {"patch_size": [3, 6], "position": "anywhere", "color": [128, 255],
                                    "alpha": [0.8, 1.0]},
                        "blended": {"alpha": [0.1, 0.25]}, "wanet": {"strength": [0.5, 1.0]}},
              recipe={"lr": [0.02, 0.05], "batch_size": [64, 128]})
MNIST = ImageShape(1, 28, 28, 10)


def test_the_specs_are_a_function_of_seed_kind_and_index() -> None:
    design = Design.from_config(**DESIGN)
    specs = design.specs(0, 40, 40, MNIST)
    assert specs == design.specs(0, 40, 40, MNIST)
    assert specs[:6] == [spec for spec in design.specs(0, 3, 3, MNIST)]
    assert design.spec(0, TROJAN, 17, MNIST) == next(spec for spec in specs if spec.name == "trojan-017")
    other = design.specs(1, 40, 40, MNIST)
    assert [s.seed for s in other] != [s.seed for s in specs] and [s.attack for s in other] != [s.attack for s in specs]
    # balanced: 40 trojaned models over 4 families give 10 each; the order depends on the seed
    trojaned = [spec for spec in specs if spec.trojaned]
    assert Counter(spec.family for spec in trojaned) == {family: 10 for family in DESIGN["families"]}
    orders = {tuple(design.family_order(seed)) for seed in range(8)}
    assert len(orders) > 1
    assert {spec.family for spec in specs if not spec.trojaned} == {CLEAN}
    assert all(spec.attack == {} for spec in specs if not spec.trojaned)


def test_the_draws_stay_in_their_ranges_and_cover_them() -> None:
    specs = Design.from_config(**DESIGN).specs(3, 400, 0, MNIST)
    badnets = [spec.attack for spec in specs if spec.family == "badnets"]
    sizes = [attack["patch_size"] for attack in badnets]
    assert min(sizes) == 3 and max(sizes) == 6 and all(isinstance(size, int) for size in sizes)
    for attack in badnets:
        top, left = attack["position"]
        assert 0 <= top <= 28 - attack["patch_size"] and 0 <= left <= 28 - attack["patch_size"]
        assert 128 <= attack["color"] <= 255 and 0.8 <= attack["alpha"] <= 1.0
    # positions reach every edge, so "anywhere" is anywhere the patch fits
    assert min(a["position"][0] for a in badnets) == 0
    assert max(a["position"][0] + a["patch_size"] for a in badnets) == 28
    rates = [spec.attack["poison_rate"] for spec in specs]
    assert 0.05 <= min(rates) < 0.07 and 0.18 < max(rates) <= 0.2
    assert len({spec.attack["target_class"] for spec in specs}) == 10
    rgb = Design.from_config(**DESIGN).specs(3, 8, 0, ImageShape(3, 12, 12, 4))
    assert all(len(spec.attack["color"]) == 3 for spec in rgb if spec.family == "badnets")
    assert all(0 <= spec.attack["target_class"] < 4 for spec in rgb)


def test_shards_split_every_family_between_the_jobs() -> None:
    specs = Design.from_config(**DESIGN).specs(0, 40, 40, MNIST)
    assigned = shard_of(specs, 3)
    assert set(assigned) == {spec.name for spec in specs} and set(assigned.values()) == {0, 1, 2}
    for family in [*DESIGN["families"], CLEAN]:
        per_job = Counter(assigned[spec.name] for spec in specs if spec.family == family)
        assert max(per_job.values()) - min(per_job.values()) <= 1


BAD_INPUT = [
    (["trojaned=-1"], "trojaned", ">= 0"),
    (["trojaned=0", "clean=0"], "trojaned", "no model"),
    (["families=[badnets,nosuch]"], "families", "valid: "),
    (["families=[trojannet]"], "families", "wanet"),
    (["poison_rate=[0.3,0.1]"], "poison_rate", "low 0.3 > high 0.1"),
    (["triggers.badnets.patch_size=[3,40]"], "triggers.badnets.patch_size", "larger than the dataset's 12x12"),
    (["triggers.blended.alpha=[2.0,3.0]"], "triggers.blended.alpha", "must be in"),
    (["+triggers.badnets.nosuch=1"], "triggers.badnets.nosuch", "no field"),
    (["recipe.lr=[]"], "recipe.lr", "non-empty"),
    (["shard=2", "shards=2"], "shard", "[0, 1]"),
]


@pytest.mark.parametrize("overrides, field, words", BAD_INPUT, ids=[" ".join(case[0]) for case in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(overrides: list[str], field: str, words: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "zoo", tmp_path / "cache"
    code, trained = run_zoo([*TINY, "trojaned=2", "clean=1", f"out={out}", f"cache_dir={cache}", *overrides],
                            tmp_path / "hydra")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"bdlab: invalid config: {field}: ") and words in lines[0], lines[0]
    assert trained == [] and not out.exists()
    assert not cache.exists() or not any(path.is_file() for path in cache.rglob("*"))


def test_hydra_values_read_back_as_written() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in (None, True, 3, 0.125, "bottom_right", "a b", "null", "1", [3, 12], [0.5, "x"]):
        parsed = parser.parse_override(f"key={hydra_value(value)}").value()
        assert parsed == value and type(parsed) is type(value)
