"""Artifact cache: keyed by the spec, reused, atomic, built once under concurrency."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from bdlab.cache import ArtifactCache, spec_hash


def test_hash_ignores_key_order_and_sees_values() -> None:
    assert spec_hash({"a": 1, "b": {"c": 2}}) == spec_hash({"b": {"c": 2}, "a": 1})
    assert spec_hash({"a": 1}) != spec_hash({"a": 2})


def test_reuse(tmp_path: Path) -> None:
    cache, builds = ArtifactCache(tmp_path), []

    def build():
        builds.append(1)
        return {"w": torch.arange(4.0)}

    first, reused_first = cache.get_or_build("models/x", {"k": 1}, build)
    second, reused_second = cache.get_or_build("models/x", {"k": 1}, build)
    assert (reused_first, reused_second) == (False, True) and len(builds) == 1
    assert torch.equal(first["w"], second["w"])
    cache.get_or_build("models/x", {"k": 2}, build)
    assert len(builds) == 2
    assert (cache.path("models/x", {"k": 1}) / "spec.json").is_file()


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def broken():
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError):
        cache.get_or_build("models/x", {"k": 1}, broken)
    leftovers = [p for p in (tmp_path / "models" / "x").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    _, reused = cache.get_or_build("models/x", {"k": 1}, lambda: {"w": torch.ones(1)})
    assert not reused


def _build_in_process(root: str, log: str) -> None:
    def slow_build():
        with open(log, "a") as stream:
            stream.write("built\n")
        time.sleep(0.5)
        return {"w": torch.ones(3)}

    ArtifactCache(root).get_or_build("models/x", {"k": 1}, slow_build)


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_in_process, args=(str(tmp_path / "c"), str(log))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert log.read_text().count("built") == 1
