"""Multi-GPU training of one run through Lightning DDP, checked on CPU with two processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bdlab.training.loader import TensorBatches
from tests.conftest import TINY_RUN
from tests.sweep_helpers import isolated_env, results

# the session-wide tiny_sweep fixture, shared with the other sweep tests (one run for all)
pytest_plugins = ["tests.sweep_helpers"]


def test_two_process_ddp_run_reports_the_single_process_keys(tiny_sweep: tuple[Path, subprocess.CompletedProcess],
                                                             tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bdlab.run", *TINY_RUN, "trainer.max_epochs=2", "trainer.accelerator=cpu",
               "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=tmp_path, env=isolated_env(tmp_path, tmp_path / "cache"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    # both ranks trained each model; only rank 0 wrote the results and the cache entries
    assert log.count("training the clean model") == 2 and log.count("training the trojan model") == 2
    assert log.count("stored models/clean") == 1 and log.count("stored models/trojan") == 1
    assert (tmp_path / "run" / "train_ddp_process_1.log").is_file()
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    single = results(tiny_sweep[0])["badnets/none/128"]
    assert run["status"] == "ok" and set(run["metrics"]) == set(single["metrics"])
    assert sorted(p.parent.parent.name for p in (tmp_path / "cache" / "models").glob("*/*/tensors.safetensors")) == \
        ["clean", "trojan"]
    # a DDP model is another recipe (twice the images per step): it never shares a single-process entry
    assert run["artifacts"]["trojan_model"]["path"].split("/")[-1] != \
        single["artifacts"]["trojan_model"]["path"].split("/")[-1]


def test_tensor_batches_shard_disjointly_and_evenly() -> None:
    images, labels = torch.arange(103).view(103, 1, 1, 1), torch.arange(103)
    shards = [TensorBatches(images, labels, batch_size=8, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for epoch in range(2):  # each epoch reshuffles identically on both ranks
        seen = [torch.cat([batch_labels for _, batch_labels, _ in shard]) for shard in shards]
        assert len(seen[0]) == len(seen[1]) == 51 and len(shards[0]) == len(shards[1]) == 7
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
    single = TensorBatches(images, labels, batch_size=8, seed=3)
    single.shard(1, 2)
    assert torch.equal(torch.cat([b for _, b, _ in single]), torch.cat([b for _, b, _ in
                       TensorBatches(images, labels, batch_size=8, seed=3, rank=1, world_size=2)]))
