"""The Python API: the notebook runs top to bottom, and its ACC and ASR equal the command line's for the same
settings to the last digit (each trained from scratch, in its own cache); bad use is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import bdlab
from bdlab.attacks import BadNets
from bdlab.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
# the notebook's settings, as command-line overrides
NOTEBOOK_RUN = ["dataset=synthetic", "dataset.channels=1", "dataset.size=16", "dataset.train_size=2000",
                "dataset.test_size=300", "dataset.defense_fraction=0.3", "model=lenet", "attack=badnets",
                "attack.target_class=0", "trainer.max_epochs=5", "trainer.enable_progress_bar=false", "logger=none"]


def test_the_notebook_runs_and_agrees_with_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDLAB_CACHE", str(tmp_path / "api_cache"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = nbformat.read(REPO / "notebooks" / "api.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    api = json.loads(outputs[-1]["text"].strip().splitlines()[-1])
    assert (tmp_path / "trojaned.safetensors").is_file()

    env = {**os.environ, "PYTHONPATH": str(REPO), "BDLAB_CACHE": str(tmp_path / "cli_cache")}
    done = subprocess.run([sys.executable, "-m", "bdlab.run", *NOTEBOOK_RUN, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert (api["acc"], api["asr"]) == (cli["trojan/acc"], cli["trojan/asr"])
    assert api["asr"] > 20  # a backdoor was planted: equality of two broken runs proves nothing


@pytest.fixture(scope="module")
def tiny() -> bdlab.api.Data:
    return bdlab.load_data("synthetic", channels=1, size=16, train_size=300, test_size=200, defense_fraction=0.3)


def test_a_plain_module_is_measured_and_unnamed_metrics_are_not_applicable(tiny) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    metrics = bdlab.measure(net, tiny)
    assert 0 <= metrics["trojan/acc"] <= 100
    assert all(metrics[key] != metrics[key] for key in ("trojan/asr", "clean/acc", "attack/cad"))  # NaN: n/a
    with_clean = bdlab.measure(net, tiny, clean=net)
    assert with_clean["clean/acc"] == with_clean["trojan/acc"] and with_clean["attack/cad"] == 0


def test_bad_use_is_one_clear_line(tiny) -> None:
    with pytest.raises(RuntimeError, match="not set up: call setup"):
        BadNets().poison_train(tiny.train)
    with pytest.raises(ConfigError, match="attack.patch_sise: BadNets has no such field"):
        bdlab.attack("badnets", patch_sise=3)
    with pytest.raises(ConfigError, match="defense.fpr"):
        bdlab.defense("strip", fpr=2.0)
    with pytest.raises(ConfigError, match="scores no inputs"):
        bdlab.defense("shrinkpad").scores(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10)),
                                          tiny.test.images[:4], tiny)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        bdlab.nosuch  # noqa: B018


def test_from_tensors_is_keyed_by_content(tiny, tmp_path: Path) -> None:
    first = bdlab.from_tensors(tiny.train.images, tiny.train.labels, tiny.test.images, tiny.test.labels,
                               cache_dir=tmp_path)
    again = bdlab.from_tensors(tiny.train.images.float() / 255, tiny.train.labels, tiny.test.images,
                               tiny.test.labels, cache_dir=tmp_path)
    assert first.overrides == again.overrides and torch.equal(first.train.images, tiny.train.images)
    changed = tiny.train.images.clone()
    changed[0, 0, 0, 0] ^= 1
    other = bdlab.from_tensors(changed, tiny.train.labels, tiny.test.images, tiny.test.labels, cache_dir=tmp_path)
    assert other.fields["path"] != first.fields["path"]
    assert len(list((tmp_path / "api" / "tensors").glob("*.safetensors"))) == 2
