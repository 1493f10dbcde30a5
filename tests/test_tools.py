"""The benchmark and export entry points."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bdlab import bench, export
from bdlab.training.fit import fit
from bdlab.training.victim import CoOptimisationModule
from tests.conftest import TINY_RUN

TINY_OVERRIDES = [o for o in TINY_RUN if not o.startswith(("logger=", "trainer.max_epochs", "trainer.enable"))]


def test_bench_train_writes_a_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "train.md"
    assert bench.main(["train", *TINY_OVERRIDES, "--repeats", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| synthetic | lenet | none |" in table and "| synthetic | lenet | badnets |" in table
    assert "images/s" in capsys.readouterr().out


def test_bench_train_times_the_attacks_own_training_module(tmp_path: Path, monkeypatch) -> None:
    timed: list[object] = []

    def recording_fit(module, *args, **kwargs) -> None:
        timed.append(module)
        fit(module, *args, **kwargs)

    monkeypatch.setattr(bench, "fit", recording_fit)
    out = tmp_path / "train.md"
    overrides = [*TINY_OVERRIDES, "attack=imc", "attack.init=scratch", "attack.trigger_every=4"]
    assert bench.main(["train", *overrides, "--repeats", "1", "--out", str(out)]) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| synthetic | lenet | imc[init=scratch] |"))
    assert float(row.split("|")[4]) > 0  # images/s of that module; its speed belongs to benchmarks/, not here
    # what is timed is IMC's co-optimisation module (the trigger is a trained part), not plain victim training
    assert [type(module) for module in timed] == [CoOptimisationModule]


def test_bench_bad_input(tmp_path: Path) -> None:
    assert bench.main(["train", *TINY_OVERRIDES, "attack.poison_rate=2", "--out", str(tmp_path / "t.md")]) == 2
    assert not (tmp_path / "t.md").exists()


def test_export_roundtrip(tmp_path: Path) -> None:
    out = tmp_path / "poisoned.safetensors"
    assert export.main([f"out={out}", *TINY_OVERRIDES, "attack.poison_rate=0.2"]) == 0
    poisoned, metadata = export.load_poisoned_set(out)
    assert poisoned.images.dtype == torch.uint8 and len(poisoned) == 2000
    assert int(poisoned.is_poison.sum()) == 400 and (poisoned.labels[poisoned.is_poison] == 0).all()
    assert metadata["attack"] == "badnets" and '"poison_rate": 0.2' in metadata["attack_config"]


def test_export_refuses_no_attack(tmp_path: Path) -> None:
    assert export.main([f"out={tmp_path / 'x.safetensors'}", *TINY_OVERRIDES, "attack=none"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_bench_inspect_times_both_modes_of_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "inspect.md"
    overrides = [*TINY_OVERRIDES, "attack.patch_size=4", "dataset.defense_fraction=0.4", "defense.epochs=3",
                 "defense.optimisation_images=64", "defense.evaluation_images=50"]
    assert bench.main(["inspect", *overrides, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| synthetic |")]
    assert [row.split("|")[5].strip() for row in rows] == ["batched", "sequential"]
    assert rows[0].split("|")[8] == rows[1].split("|")[8]  # the same class-epochs in both modes
    assert bench.main(["inspect", *TINY_OVERRIDES, "defense=strip", "--out", str(tmp_path / "x.md")]) == 2


def test_gpu_script_passes_its_cpu_smoke() -> None:
    """benchmarks/gpu.sh --cpu-smoke: the GPU readiness script's steps shrunk to the CPU, each writing rows that
    name the device, in a temporary folder: the committed tables are left alone."""
    repo = Path(__file__).resolve().parents[1]
    committed = {name: (repo / "benchmarks" / name).read_text() for name in ("train.md", "inspect.md")}
    # the script's `python` is this interpreter, as on the device machine it is the image's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(repo / "benchmarks" / "gpu.sh"), "--cpu-smoke"], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(done.stdout.splitlines()[-1].split(" rows in ")[1].split("/train.md")[0])
    train = [r for r in (out / "train.md").read_text().splitlines() if r.startswith("| synthetic | resnet18 |")]
    inspect = [r for r in (out / "inspect.md").read_text().splitlines() if r.startswith("| synthetic | resnet18 |")]
    assert [r.split("|")[3].strip() for r in train] == ["none", "badnets", "none", "imc[init=scratch]"]
    assert [r.split("|")[5].strip() for r in inspect] == ["batched", "sequential"]
    assert all(r.split("|")[-2].strip() == bench.device_name(torch.device("cpu")) for r in train + inspect)
    assert {name: (repo / "benchmarks" / name).read_text() for name in committed} == committed
    shutil.rmtree(out)
