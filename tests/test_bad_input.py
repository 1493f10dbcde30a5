"""Bad input on the command line: one line ``bdlab: invalid config: <full.field.path>: ...`` on stderr, exit 2,
nothing written (no results.json, no cache entry), whatever the option group or the kind of mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdlab.compose import CONFIG_DIR, compose_config
from bdlab.errors import ConfigError, build
from bdlab.run import cli
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


BAD_INPUT = [
    # not a bool, a fraction where an integer is due, a word where a number is due
    (["attack=imc", "attack.learn_mask=maybe"], "attack.learn_mask", "true or false"),
    (["attack=imc", "attack.learn_mask=2"], "attack.learn_mask", "true or false"),
    (["attack=issba", "attack.encoder_epochs=1.5"], "attack.encoder_epochs", "an integer"),
    (["defense=neural_cleanse", "defense.epochs=abc"], "defense.epochs", "an integer"),
    (["defense=fine_pruning", "defense.epochs=abc"], "defense.epochs", "an integer"),
    (["defense=adversarial_retraining", "defense.epochs=abc"], "defense.epochs", "an integer"),
    (["attack=wanet", "attack.strength=abc"], "attack.strength", "a number"),
    (["attack=refool", "attack.strength=abc"], "attack.strength", "must be"),
    (["attack=input_aware", "attack.mask_density=abc"], "attack.mask_density", "a number"),
    (["attack.patch_size=abc"], "attack.patch_size", "an integer"),
    # a nested node is named by its full path
    (["defense=unlearning", "defense.inspector.epochs=abc"], "defense.inspector.epochs", "an integer"),
    # one wrong type per option group
    (["dataset.train_size=1.5"], "dataset.train_size", "an integer"),
    (["model=resnet18", "model.net.width=1.5"], "model.net.width", "an integer"),
    (["attack.poison_rate=abc"], "attack.poison_rate", "a number"),
    (["defense=strip", "defense.fpr=abc"], "defense.fpr", "a number"),
    (["trainer.enable_progress_bar=maybe"], "trainer.enable_progress_bar", "true or false"),
    (["analysis=saliency", "analysis.saliency.images=abc"], "analysis.saliency.images", "an integer"),
    (["logger=wandb", "logger.wandb.log_model=maybe"], "logger.wandb.log_model", "one of all"),
    # values the constructors refuse, and fields no option has
    (["attack.poison_rate=0"], "attack.poison_rate", "(0"),
    (["attack.target_class=12"], "attack.target_class", "got 12"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs", "no limit"),
    (["defense=shrinkpad", "defense.size=16"], "defense.size", "got 16"),
    (["defense=k_arm", "defense.candidates=20"], "defense.candidates", "20"),
    (["attack=refool", "defense=strip", "defense.fpr=1.5"], "defense.fpr", "got 1.5"),
    (["defense=hardening", "defense.pairs=100000", "defense.distance_images=10"], "defense.pairs", "100000"),
    (["defense=hardening", "defense.distance_images=100000"], "defense.distance_images", "100000"),
    (["+attack.nosuch=1"], "attack.nosuch", "no such field"),
    (["dataset.nosuch=1"], "dataset.nosuch", "+dataset.nosuch=1"),
    # keys of the nodes without a _target_ that nothing would read
    (["+model.checkpoint=x.safetensors"], "model.checkpoint", "model.weights=PATH"),
    (["+seeds=3"], "seeds", "no such field"),
    (["+nsr.layr=fc1"], "nsr.layr", "nsr takes layer, top_k"),
    (["model.std=[0.5,0.5,0.5]"], "model.std", "give 1"),
    # unknown options: the line lists the valid ones
    (["attack=nosuch"], "attack", ", ".join(options("attack"))),
    (["+experiment=nosuch"], "experiment", ", ".join(options("experiment"))),
    (["+sweep=nosuch"], "sweep", ", ".join(options("sweep"))),
]


def assert_refused(code: object, stderr: str, run_dir: Path, cache: Path, field: str, words: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith(f"bdlab: invalid config: {field}: ") and words in lines[0], lines[0]
    assert not (run_dir / "results.json").exists()
    assert not cache.exists() or not any(path.is_file() for path in cache.rglob("*"))


@pytest.mark.parametrize("overrides, field, words", BAD_INPUT, ids=[" ".join(case[0]) for case in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(overrides: list[str], field: str, words: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """The command line as ``python -m bdlab.run`` parses it, in this process (each interpreter start costs
    seconds; one real one is below). Hydra leaves logging alone, so the test session's stays as it is."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # what cli() sets, undone after the test
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *TINY_RUN, *overrides, f"cache_dir={tmp_path / 'cache'}",
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert_refused(stop.value.code, capsys.readouterr().err, tmp_path / "run", tmp_path / "cache", field, words)


def bdlab_run(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "bdlab.run", *TINY_RUN, *overrides, f"cache_dir={tmp_path / 'cache'}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("overrides, field, words", [BAD_INPUT[0], BAD_INPUT[-3]], ids=["bool", "option"])
def test_the_command_itself_exits_2_with_one_line(overrides: list[str], field: str, words: str,
                                                  tmp_path: Path) -> None:
    process = bdlab_run(tmp_path, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    _, stderr = process.communicate(timeout=300)
    assert_refused(process.returncode, stderr, tmp_path / "run", tmp_path / "cache", field, words)


def test_a_config_error_inside_a_nested_build_is_named_by_its_path() -> None:
    node = compose_config(["defense=unlearning", "defense.inspector.epochs=0"]).defense.inspector
    with pytest.raises(ConfigError) as info:
        build(node, path="defense.inspector")
    assert info.value.field == "defense.inspector.epochs" and str(info.value).startswith("defense.inspector.epochs: ")
    with pytest.raises(ConfigError) as info:  # its own key is its path when it sits in the run config
        build(compose_config(["defense=unlearning", "defense.inspector.patience=abc"]).defense.inspector)
    assert info.value.field == "defense.inspector.patience"


def test_two_runs_started_in_the_same_second_keep_their_own_results(tmp_path: Path) -> None:
    tiny = ["attack=none", "dataset.train_size=200", "dataset.test_size=100", "trainer.max_epochs=1"]
    runs = [bdlab_run(tmp_path, *tiny, f"seed={seed}") for seed in (1, 2)]
    for process in runs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
    results = sorted((tmp_path / "outputs").rglob("results.json"))
    assert len(results) == 2 and len({path.parent for path in results}) == 2
    assert {json.loads(path.read_text())["seed"] for path in results} == {1, 2}
    # named to the microsecond, so runs that resolve their directory in the same second still get two
    assert all(len(path.parent.name.split("-")[-1]) == 6 for path in results), results
