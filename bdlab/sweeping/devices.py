"""One GPU per job when a sweep's jobs run side by side on a machine with several GPUs.

Each job claims the first free GPU through a lock file (starting from its job number, so
jobs spread out), holds it while it runs, and trains and evaluates on it alone. Lock files
rather than ``CUDA_VISIBLE_DEVICES``: a joblib worker process runs several jobs one after
another and CUDA reads that variable once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger(__name__)

POLL_S = 5.0


def wants_one_gpu(trainer_cfg: DictConfig) -> bool:
    """A job asks for one GPU unless it runs on CPU or spans several devices itself (DDP)."""
    return str(trainer_cfg.get("accelerator", "auto")) not in ("cpu", "mps") and trainer_cfg.get("devices", 1) in (1, "1")


def claim_gpu(lock_dir: Path, count: int, first: int) -> tuple[int, FileLock]:
    """Block until one of ``count`` GPUs is free; return its index and the held lock."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(lock_dir / f"gpu-{index}.lock")) for index in range(count)]
    while True:
        for step in range(count):
            index = (first + step) % count
            try:
                locks[index].acquire(timeout=0)
                return index, locks[index]
            except Timeout:
                continue
        # every GPU is busy: wait on the one this job would have taken first
        try:
            locks[first % count].acquire(timeout=POLL_S)
            return first % count, locks[first % count]
        except Timeout:
            continue


@contextmanager
def gpu_slot(cfg: DictConfig, cache_dir: Path) -> Iterator[int | None]:
    """Run the body on a GPU of its own when the machine has several; yields its index or None."""
    count = torch.cuda.device_count()
    if count < 2 or not wants_one_gpu(cfg.trainer):
        yield None
        return
    job = HydraConfig.get().job.num if HydraConfig.initialized() else 0
    index, lock = claim_gpu(cache_dir.expanduser() / "gpu-locks", count, int(job or 0))
    try:
        torch.cuda.set_device(index)
        cfg.trainer.devices = [index]
        log.info("job %s runs on GPU %d of %d", job, index, count)
        yield index
    finally:
        lock.release()
