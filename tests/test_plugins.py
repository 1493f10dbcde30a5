"""Methods outside the tree (bdlab.plugins): the example package of ``examples/bdlab_example_plugin/``, copied to a
temporary package under another name, runs through ``BDLAB_PLUGINS``; its options compose, its fields are checked
like bdlab's own, and docs/extending.md shows its files as they are."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import get_object
from omegaconf import OmegaConf

from bdlab import plugins
from bdlab.compose import compose_config
from bdlab.errors import ConfigError, check_config, signature
from bdlab.run import cli
from tests.conftest import TINY_RUN
from tests.test_config_defaults import constructor_default, normalise

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "bdlab_example_plugin"
PACKAGE = "bdlab_example_plugin"
OPTIONS = ["attack=plus_patch", "defense=median_filter"]


def example_files() -> list[Path]:
    """The example's source files (not what Python or an install left beside them)."""
    return sorted(p for p in EXAMPLE.rglob("*") if p.is_file() and not any(
        part == "__pycache__" or part == "build" or part.endswith(".egg-info") for part in p.parts))


def renamed_copy(root: Path, name: str = "my_backdoors") -> Path:
    """The example package copied under ``root`` as ``name`` (every mention of its name replaced): what a user
    who copies and renames it gets. Returns the folder to put on the path."""
    target = root / name
    shutil.copytree(EXAMPLE / PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*"):
        if path.is_file():
            path.write_text(path.read_text().replace(PACKAGE, name))
    return root


def bdlab(tmp_path: Path, *overrides: str, plugin_path: Path, plugin: str, run_dir: str = "run"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(plugin_path)]), "BDLAB_PLUGINS": plugin}
    return subprocess.run([sys.executable, "-m", "bdlab.run", *overrides, f"hydra.run.dir={tmp_path / run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example importable in this process and named in BDLAB_PLUGINS."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv(plugins.ENV, PACKAGE)


def test_the_docs_show_every_file_of_the_example_as_it_is() -> None:
    doc = (REPO / "docs" / "extending.md").read_text()
    shown = {path: text for path, text in
             re.findall(r"^`(examples/[^`]+)`:\n\n```[a-z]*\n(.*?)^```$", doc, flags=re.MULTILINE | re.DOTALL)}
    files = {str(path.relative_to(REPO)): path.read_text() for path in example_files()}
    assert set(shown) == set(files)
    for path, text in files.items():
        assert shown[path] == text, f"docs/extending.md's {path} differs from the shipped file"


def test_the_example_options_give_every_field_at_its_constructor_default(example: None) -> None:
    for group, option in (item.split("=") for item in OPTIONS):
        node = compose_config([f"{group}={option}"])[group]
        target = get_object(node._target_)
        values = OmegaConf.to_container(node, resolve=True)
        assert set(values) - {"_target_"} == set(signature(target)[0]), f"{option}: not every constructor field"
        for key in node:
            if not key.startswith("_") and not OmegaConf.is_interpolation(node, key):
                assert normalise(values[key]) == normalise(constructor_default(target, key)), f"{option}.{key}"


def test_compose_config_sees_the_plugin_groups(example: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config([*TINY_RUN, *OPTIONS])
    assert cfg.attack._target_ == f"{PACKAGE}.attacks.PlusPatch"
    assert cfg.defense._target_ == f"{PACKAGE}.defenses.MedianFilter"
    check_config(cfg)
    assert "plus_patch" in plugins.group_options("attack") and "badnets" in plugins.group_options("attack")
    assert plugins.load_option("attack", "plus_patch").size == 5 and plugins.load_option("attack", "nope") is None
    assert plugins.load_option("defense", "shrinkpad").size == 4 and plugins.group_options("no_such_group") is None
    with pytest.raises(ConfigError, match="attack.sise: PlusPatch has no such field; it takes size, margin"):
        check_config(compose_config([*TINY_RUN, *OPTIONS, "+attack.sise=7"]))

    # a -m grid's option check knows them too
    from bdlab.sweeping.callback import grid_problems
    grid = OmegaConf.create({"hydra": {"sweeper": {"params": {"attack": "badnets,plus_patch"}},
                                       "runtime": {"choices": {"sweep": "x"}}, "searchpath": [],
                                       "overrides": {"task": ["defense=median_filter,nope"]}}})
    assert [problem.split(" (")[0] for problem in grid_problems(grid)] == ["unknown defense option 'nope'"]

    # without the variable: Hydra's own hydra.searchpath, or nothing
    monkeypatch.delenv(plugins.ENV)
    searchpath = f"hydra.searchpath=[pkg://{PACKAGE}.conf]"
    assert compose_config([searchpath, *OPTIONS]).attack.size == 5
    with pytest.raises(MissingConfigException):
        compose_config(OPTIONS)


def test_where_a_package_keeps_its_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plain_conf" / "conf" / "attack").mkdir(parents=True)  # conf/ without __init__.py: a file:// path
    (tmp_path / "plain_conf" / "__init__.py").write_text("")
    (tmp_path / "declared").mkdir()
    (tmp_path / "declared" / "__init__.py").write_text("BDLAB_SEARCHPATH = ['pkg://declared.options']\n")
    (tmp_path / "code_only.py").write_text("")
    assert plugins.plugin_searchpath(["plain_conf", "declared", "code_only"]) == \
        [f"file://{(tmp_path / 'plain_conf' / 'conf').resolve()}", "pkg://declared.options"]
    assert plugins.plugin_names(" plain_conf,,declared , plain_conf") == ["plain_conf", "declared"]
    with pytest.raises(ConfigError, match=r"^BDLAB_PLUGINS: cannot import 'no_such_plugin' \(No module named"):
        plugins.load(["no_such_plugin"])
    monkeypatch.setenv(plugins.ENV, "my backdoors")
    with pytest.raises(ConfigError, match="^BDLAB_PLUGINS: 'my backdoors' is not a package name"):
        compose_config([])


@pytest.mark.parametrize("plugin, overrides, line", [
    ("my_backdors", [], ("BDLAB_PLUGINS: cannot import 'my_backdors' (No module named 'my_backdors'); install it, or "
                        "put the folder that holds it on PYTHONPATH")),
    ("my_backdoors", ["+attack.sise=7"], ("attack.sise: PlusPatch has no such field; it takes size, margin, "
                                         "poison_rate, target_class, seed, enhance, enhance_max_shrink, init, mixing, mixing_weight")),
    ("my_backdoors", ["defense.window=4"], "defense.window: got 4, must be odd and >= 1"),
], ids=["unimportable plugin", "unknown plugin field", "value its constructor refuses"])
def test_bad_plugins_and_their_bad_fields_are_one_line_exit_2(plugin: str, overrides: list[str], line: str,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """The command line as ``python -m bdlab.run`` parses it, in this process (as test_bad_input.py does)."""
    monkeypatch.syspath_prepend(str(renamed_copy(tmp_path / "packages")))
    monkeypatch.setenv(plugins.ENV, plugin)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # what cli() sets, undone after the test
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *TINY_RUN, *OPTIONS, *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"bdlab: invalid config: {line}"]
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_copied_and_renamed_example_runs_end_to_end(tmp_path: Path) -> None:
    path = renamed_copy(tmp_path / "packages")
    result = bdlab(tmp_path, *TINY_RUN, *OPTIONS, "attack.poison_rate=0.2", plugin_path=path, plugin="my_backdoors")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["status"], results["attack"], results["defense"]) == ("ok", "plus_patch", "median_filter")
    assert results["config"]["attack"]["_target_"] == "my_backdoors.attacks.PlusPatch"
    metrics = results["metrics"]
    assert metrics["trojan/acc"] > 80 and metrics["trojan/asr"] > 80
    assert metrics["defense/asr_before"] == metrics["trojan/asr"]
    assert {"defense/asr", "defense/acc", "defense/ard", "defense/cad"} <= set(metrics)
    assert metrics["defense/ard"] == pytest.approx(metrics["trojan/asr"] - metrics["defense/asr"])
    assert results["residual"]["asr"] == "defense/asr"
