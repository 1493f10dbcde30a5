"""TrojanZoo §6 RQ5 (skip-connection gradients, ``attack.skip_gamma``) and RQ7 (``attack.trigger_optimisation``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bdlab.attacks import IMC
from bdlab.attacks.skip_gradient import SkipGradientScale, residual_shortcuts
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.models.resnet import BasicBlock
from bdlab.pipeline import execute, prepare
from tests.conftest import TINY_RUN, StubResources
from tests.test_bad_input import assert_refused
from tests.test_training_attacks import lenet, splits
from tests.test_transforms import shared_cache


def block_gradient(block: BasicBlock, x: torch.Tensor, gamma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """d sum(block(x)) / dx with the skip path's gradient scaled by gamma (None: unhooked), and the output."""
    scale = SkipGradientScale(gamma) if gamma is not None else None
    if scale is not None:
        scale.install(block)
    x = x.clone().requires_grad_(True)
    out = block(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    if scale is not None:
        scale.remove()
    return grad, out.detach()


def test_gamma_scales_only_the_skip_share_of_a_residual_blocks_gradient() -> None:
    torch.manual_seed(0)
    block = BasicBlock(3, 3).eval()  # identity shortcut: out = relu(residual(x) + x)
    x = torch.randn(2, 3, 5, 5)
    plain, out = block_gradient(block, x, None)
    no_skip, _ = block_gradient(block, x, 0.0)
    half, _ = block_gradient(block, x, 0.5)
    # by hand: the identity path contributes d relu(z) / dz = 1 where the output is positive, 0 elsewhere
    skip_share = (out > 0).float()
    assert skip_share.sum() > 0 and (1 - skip_share).sum() > 0
    assert torch.allclose(plain - no_skip, skip_share, atol=1e-5)
    assert torch.allclose(half, no_skip + 0.5 * skip_share, atol=1e-5)
    # the forward pass is unchanged, and removing the hooks restores the plain gradient
    scale = SkipGradientScale(0.5)
    scale.install(block)
    assert torch.equal(block(x), out)
    with torch.no_grad():
        block(x)  # nothing to hook without gradients
    scale.remove()
    again, _ = block_gradient(block, x, None)
    assert torch.allclose(again, plain) and not scale.handles


def test_gamma_reaches_a_projection_shortcut_too() -> None:
    torch.manual_seed(1)
    block = BasicBlock(2, 4, stride=2).eval()  # the skip path is a 1x1 convolution and batch norm
    x = torch.randn(1, 2, 6, 6)
    plain, _ = block_gradient(block, x, None)
    no_skip, _ = block_gradient(block, x, 0.0)
    quarter, _ = block_gradient(block, x, 0.25)
    assert not torch.allclose(plain, no_skip)
    assert torch.allclose(quarter, no_skip + 0.25 * (plain - no_skip), atol=1e-5)


def test_only_bdlab_residual_blocks_have_a_scalable_skip_path() -> None:
    from bdlab.models import ResNet18

    assert len(residual_shortcuts(ResNet18(3, 10, width=4))) == 8
    assert residual_shortcuts(lenet().net) == []


def test_skip_gamma_trains_a_tiny_resnet_and_leaves_no_hook(tmp_path: Path, tmp_path_factory) -> None:
    overrides = [*TINY_RUN, "dataset.channels=3", "dataset.train_size=600", "dataset.test_size=100", "model=resnet18",
                 "model.net.width=4", "trainer.max_epochs=1", "attack=imc", "attack.init=scratch",
                 "attack.trigger_every=4", "attack.trigger_steps=2", "attack.skip_gamma=0.5",
                 f"cache_dir={shared_cache(tmp_path_factory)}"]
    experiment = prepare(compose_config(overrides))
    outcome = execute(experiment, tmp_path / "run", [])
    assert experiment.attack.skip_scale.gamma == 0.5 and experiment.attack.skip_scale.handles == []
    assert outcome["metrics"]["trojan/asr"] >= 0  # a number: the run finished with metrics


def trigger_after(strategy: str) -> tuple[IMC, torch.Tensor, torch.Tensor]:
    """IMC set up on tiny data with the given strategy: the attack, its pattern before and after
    ``training_set`` (where the trigger optimised before training is made)."""
    attack = IMC(trigger_optimisation=strategy, preprocess_images=50, threshold=0.0)
    data = splits()
    attack.setup(data, StubResources(Path("."), {0: lenet()}))
    before = attack.pattern.clone()
    attack.training_set(data.train)
    return attack, before, attack.pattern.clone()


def test_the_three_trigger_strategies_differ_only_in_how_the_pattern_is_made() -> None:
    none, start, after = trigger_after("none")
    inside = none.mask[0] > 0
    assert torch.equal(start, after) and (after[:, inside] == 1.0).all() and after[:, ~inside].abs().sum() == 0
    assert none.auxiliaries() == []  # trained by the plain victim module: the patch stays fixed
    before, start, after = trigger_after("before")
    assert not torch.equal(start, after) and before.auxiliaries() == []  # optimised once, then fixed
    co, _, _ = trigger_after("co")
    assert co.auxiliaries() == [co.trigger]  # a trainable part of the co-optimisation module


@pytest.mark.parametrize("shape", ["square", "random"])
def test_a_predefined_trigger_is_badnets_own_for_either_shape(shape: str) -> None:
    """RQ7's "none" with RQ2's random shape: the pattern is BadNets' patch on BadNets' pixels, in its order."""
    from bdlab.attacks import BadNets

    fields = {"trigger_shape": shape, "patch_size": 3, "color": 90, "seed": 4}
    data = splits()
    badnets = BadNets(**fields)
    badnets.setup(data)
    imc = IMC(trigger_optimisation="none", preprocess_images=50, threshold=0.0, **fields)
    imc.setup(data, StubResources(Path("."), {0: lenet()}))
    assert torch.equal(imc.mask, badnets.mask) and torch.equal(imc.pattern, badnets.pattern)


@pytest.mark.parametrize("strategy", ["none", "before"])
def test_a_fixed_trigger_leaves_training_unchanged(strategy: str, tmp_path: Path, tmp_path_factory) -> None:
    overrides = [*TINY_RUN, "trainer.max_epochs=2", "attack=imc", "attack.init=scratch", "attack.patch_size=4",
                 f"attack.trigger_optimisation={strategy}", "attack.preprocess_images=100",
                 f"cache_dir={shared_cache(tmp_path_factory)}"]
    experiment = prepare(compose_config(overrides))
    outcome = execute(experiment, tmp_path / "run", [])
    pattern = experiment.attack.pattern
    inside = experiment.attack.mask[0] > 0
    if strategy == "none":
        assert (pattern[:, inside] == 1.0).all()
    # the pattern the poisoned test set carries is the one the model trained on (stored with the model)
    expected = (pattern * 255).round().to(torch.uint8)
    assert (outcome["poisoned_test"].images[:, :, inside] == expected[:, inside]).all()
    assert outcome["metrics"]["trojan/asr"] > outcome["metrics"]["clean/asr"]


@pytest.mark.parametrize("overrides, field", [
    (["attack.skip_gamma=1.5"], "attack.skip_gamma"),
    (["attack.skip_gamma=-0.1"], "attack.skip_gamma"),
    (["attack.skip_gamma=0.5"], "attack.skip_gamma"),  # LeNet has no skip connection
    (["attack.trigger_optimisation=joint"], "attack.trigger_optimisation"),
    (["attack.trigger_optimisation=before", "attack.learn_mask=true"], "attack.learn_mask"),
])
def test_bad_rq5_rq7_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "attack=imc", *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)


def test_a_gamma_outside_the_unit_interval_exits_2_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    process = subprocess.run([sys.executable, "-m", "bdlab.run", *TINY_RUN, "attack=imc", "attack.skip_gamma=2",
                              f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
                             capture_output=True, text=True)
    assert_refused(process.returncode, process.stderr, tmp_path / "run", tmp_path / "cache", "attack.skip_gamma",
                   "must be in [0, 1]")
