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


def stored(tmp_path: Path) -> tuple[ArtifactCache, Path, list[int]]:
    cache, builds = ArtifactCache(tmp_path), []

    def build():
        builds.append(1)
        return {"w": torch.arange(1000.0)}

    cache.get_or_build("models/x", {"k": 1}, build)
    return cache, cache.path("models/x", {"k": 1}), builds


def rebuild(cache: ArtifactCache, builds: list[int]) -> tuple[dict, bool]:
    def build():
        builds.append(1)
        return {"w": torch.arange(1000.0)}

    return cache.get_or_build("models/x", {"k": 1}, build)


def test_a_truncated_entry_is_reported_once_and_rebuilt_never_loaded(tmp_path: Path, caplog) -> None:
    cache, entry, builds = stored(tmp_path)
    tensors_file = entry / "tensors.safetensors"
    tensors_file.write_bytes(tensors_file.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="bdlab.cache"):
        tensors, reused = rebuild(cache, builds)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage() and "rebuilding" in warnings[0].getMessage()
    assert not reused and len(builds) == 2 and torch.equal(tensors["w"], torch.arange(1000.0))
    assert rebuild(cache, builds)[1] and len(builds) == 2  # the rebuilt entry is whole again


def test_an_altered_entry_with_the_right_size_is_rebuilt(tmp_path: Path) -> None:
    cache, entry, builds = stored(tmp_path)
    tensors_file = entry / "tensors.safetensors"
    data = bytearray(tensors_file.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last float
    tensors_file.write_bytes(bytes(data))
    tensors, reused = rebuild(cache, builds)
    assert not reused and tensors["w"][-1] == 999.0


def test_an_entry_from_before_manifests_is_rebuilt(tmp_path: Path, caplog) -> None:
    cache, entry, builds = stored(tmp_path)
    (entry / "manifest.json").unlink()  # what bdlab wrote before entries had a manifest
    with caplog.at_level("WARNING", logger="bdlab.cache"):
        _, reused = rebuild(cache, builds)
    assert not reused and "older bdlab" in caplog.text


def test_an_entry_the_caller_rejects_is_rebuilt(tmp_path: Path) -> None:
    cache, _, builds = stored(tmp_path)
    _, reused = cache.get_or_build("models/x", {"k": 1}, lambda: {"w": torch.ones(1), "state": torch.ones(1)},
                                   validate=lambda tensors: "state" in tensors)
    assert not reused
    tensors, reused = cache.get_or_build("models/x", {"k": 1}, lambda: {}, validate=lambda t: "state" in t)
    assert reused and set(tensors) == {"w", "state"}
