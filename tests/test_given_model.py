"""A model trained outside bdlab, scanned from the command line (``attack=given model.weights=...``): loaded
from safetensors or a ``torch.save`` state dict, never unpickled; what the user did not name is n/a."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bdlab.compose import compose_config
from bdlab.datasets.mnist import MNIST
from bdlab.errors import ConfigError
from bdlab.models.weights import backbone_state, read_state_dict, save_weights
from bdlab.pipeline import prepare
from bdlab.run import cli
from tests.conftest import TINY_RUN
from tests.test_bad_input import assert_refused

REPO = Path(__file__).resolve().parent.parent
TARGET = 0
MNIST_STATS = (["model.mean=[0.1307]", "model.std=[0.3081]"])


class PlainLeNet(nn.Module):
    """LeNet-5 written without bdlab: its parameters are named as bdlab's LeNet names them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.head = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))), 2)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BadNets-trojaned LeNet (3x3 white bottom-right patch -> class 0, 10% of 20,000 MNIST images), trained
    by a plain PyTorch loop, saved three ways; and the cache the runs share."""
    folder = tmp_path_factory.mktemp("given")
    torch.manual_seed(0)
    train, _ = MNIST(REPO / "data").load_raw()
    x, y = train.images[:20000].float() / 255, train.labels[:20000].clone()
    poison = torch.randperm(len(x))[:2000]
    poison = poison[y[poison] != TARGET]
    x[poison, :, -3:, -3:], y[poison] = 1.0, TARGET
    net = PlainLeNet()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            batch = order[start:start + 128]
            loss = F.cross_entropy(net((x[batch] - 0.1307) / 0.3081), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    save_file(net.state_dict(), str(folder / "lenet.safetensors"))
    torch.save(net.state_dict(), folder / "lenet.pt")
    torch.save(net, folder / "whole.pt")
    torch.save([1, 2], folder / "list.pt")
    (folder / "text.pt").write_text("not a checkpoint")
    return folder


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *argv, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    cli()


def scan(weights: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    run_cli(["attack=given", "logger=none", "trainer.enable_progress_bar=false", *MNIST_STATS,
             f"data_dir={REPO / 'data'}", f"cache_dir={weights / 'cache'}", f"hydra.run.dir={run_dir}", *overrides],
            monkeypatch)
    return json.loads((run_dir / "results.json").read_text())["metrics"]


def test_a_model_trained_outside_bdlab_is_scanned_and_its_target_flagged(weights: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    nc = ["defense=neural_cleanse", "defense.epochs=40"]
    metrics = scan(weights, tmp_path / "safetensors", monkeypatch, f"model.weights={weights / 'lenet.safetensors'}",
                   *nc)
    assert metrics["defense/flagged_classes"] == [TARGET]
    # nothing was named: no triggered input, no target, no clean reference -> n/a (null), never a number
    for key in ("trojan/asr", "defense/target_flagged", "defense/aiv_target", "clean/acc", "attack/cad",
                "defense/clean_aiv_max"):
        assert metrics[key] is None, key
    assert metrics["trojan/acc"] > 90
    # the same weights saved by torch.save: the same content, so the same cache entries; the target now named
    metrics = scan(weights, tmp_path / "pt", monkeypatch, f"model.weights={weights / 'lenet.pt'}",
                   f"attack.target_class={TARGET}", *nc)
    assert metrics["defense/flagged_classes"] == [TARGET] and metrics["defense/target_flagged"] == 1.0
    assert metrics["defense/aiv_target"] > 2 and metrics["trojan/asr"] is None


def test_naming_the_trigger_measures_asr_and_filters_its_inputs(weights: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = scan(weights, tmp_path / "strip", monkeypatch, f"model.weights={weights / 'lenet.pt'}",
                   f"attack.target_class={TARGET}", "attack.trigger=badnets", "defense=strip",
                   "defense.max_inputs=1000")
    assert metrics["trojan/asr"] > 90 and metrics["defense/tpr"] > 50
    assert metrics["defense/asr_after_rejection"] < metrics["trojan/asr"]
    assert metrics["clean/acc"] is None and metrics["clean/nsr"] is None
    # a trigger elsewhere than where the backdoor was planted does not fire: ASR is measured, not assumed
    other = scan(weights, tmp_path / "elsewhere", monkeypatch, f"model.weights={weights / 'lenet.pt'}",
                 f"attack.target_class={TARGET}", "attack.trigger=badnets", "+attack.trigger_args.position=top_left")
    assert other["trojan/asr"] < 50


def test_a_given_clean_reference_gives_the_clean_figures(weights: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = scan(weights, tmp_path / "clean", monkeypatch, f"model.weights={weights / 'lenet.pt'}",
                   f"attack.clean_weights={weights / 'lenet.safetensors'}")
    assert metrics["clean/acc"] == metrics["trojan/acc"] and metrics["attack/cad"] == 0.0


BAD_WEIGHTS = [
    (["model.weights={w}/nope.pt"], "model.weights", "no file at"),
    (["model.weights={w}/whole.pt"], "model.weights", "pickled"),
    (["model.weights={w}/list.pt"], "model.weights", "not a state dict"),
    (["model.weights={w}/text.pt"], "model.weights", "neither safetensors nor a torch.save file"),
    (["model.weights={w}/lenet.pt", "model=resnet18"], "model.weights", "missing"),
    (["model.weights={w}/lenet.pt", "model.mean=[0.1,0.2]"], "model.mean", "give 1"),
    (["model.weights={w}/lenet.pt", "attack.clean_weights={w}/whole.pt"], "attack.clean_weights", "pickled"),
    (["model.weights={w}/lenet.pt", "attack.trigger=imc", "attack.target_class=0"], "attack.trigger", "learns"),
    (["model.weights={w}/lenet.pt", "attack.trigger=badnets"], "attack.target_class", "give attack.target_class"),
    (["model.weights={w}/lenet.pt", "attack.trigger=nosuch", "attack.target_class=0"], "attack.trigger", "badnets"),
    (["model.weights={w}/lenet.pt", "attack.trigger=badnets", "attack.target_class=0",
      "+attack.trigger_args.patch_sise=4"], "attack.trigger_args.patch_sise", "no such field"),
    (["model.weights={w}/lenet.pt", "defense=spectral_signature"], "defense.mode", "inference"),
    (["model.weights={w}/lenet.pt", "analysis=shrink_ablation"], "analysis.shrink_ablation", "attack.trigger"),
    ([], "model.weights", "set model.weights=PATH"),
]


@pytest.mark.parametrize("overrides, field, words", BAD_WEIGHTS, ids=[" ".join(c[0]) or "none" for c in BAD_WEIGHTS])
def test_bad_weights_are_one_line_exit_2_and_write_nothing(overrides: list[str], field: str, words: str,
                                                           weights: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        run_cli(["attack=given", "logger=none", f"data_dir={REPO / 'data'}", f"cache_dir={tmp_path / 'cache'}",
                 f"hydra.run.dir={tmp_path / 'run'}", *(o.format(w=weights) for o in overrides)], monkeypatch)
    assert_refused(stop.value.code, capsys.readouterr().err, tmp_path / "run", tmp_path / "cache", field, words)


def test_keys_with_a_wrapper_prefix_load_and_wrong_shapes_are_named(weights: Path) -> None:
    plain = read_state_dict(weights / "lenet.safetensors")
    target = PlainLeNet()
    for prefix in ("net.", "model.net.", "module."):
        loaded = backbone_state({prefix + k: v for k, v in plain.items()}, target)
        assert all(torch.equal(loaded[k], plain[k]) for k in plain)
    with pytest.raises(ConfigError, match=r"head.weight has shape \(3, 84\)"):
        backbone_state({**plain, "head.weight": torch.zeros(3, 84)}, target)


def test_weights_start_every_model_and_key_its_cache(weights: Path, tmp_path: Path) -> None:
    """Outside attack=given, model.weights is where training starts (a pretrained start): the fresh model holds
    them, and the models' cache keys change with the weights' content, not their path."""
    base = [*TINY_RUN, "dataset.size=28"]
    plain = prepare(compose_config(base)).services
    given = prepare(compose_config([*base, f"model.weights={weights / 'lenet.safetensors'}"])).services
    other = prepare(compose_config([*base, f"model.weights={weights / 'lenet.pt'}"])).services
    assert torch.equal(given.new_model().net.conv1.weight, read_state_dict(weights / "lenet.pt")["conv1.weight"])
    assert given.clean_key() != plain.clean_key() and given.clean_key() == other.clean_key()
    saved = save_weights(given.new_model(), tmp_path / "copy.safetensors")
    assert set(read_state_dict(saved)) == set(read_state_dict(weights / "lenet.pt"))
    assert not math.isnan(float(given.new_model()(torch.zeros(1, 1, 28, 28)).sum()))
