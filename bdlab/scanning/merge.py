"""Merging a sharded scan: ``python -m bdlab.scan -m shard=0,1 shards=2 [hydra/launcher=joblib]`` runs one job
per share of the models; when the multirun ends, :class:`MergeShards` (registered by ``conf/scan.yaml``) writes
the outputs of the whole population into the sweep folder, exactly as a single scan would have."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bdlab.scanning.outputs import SCAN_CSV, SCAN_JSON, write_outputs
from bdlab.scanning.publish import log_to_loggers, print_summary


def scan_identity(summary: dict[str, Any]) -> str:
    """What shards of one scan share: the config but for the shard."""
    config = {key: value for key, value in summary.get("config", {}).items() if key != "shard"}
    return json.dumps(config, sort_keys=True, default=str)


def sharded_scans(sweep_dir: Path) -> list[list[dict[str, Any]]]:
    """The jobs' scan.json files of each sharded scan in the sweep (jobs of one scan differ only in their shard)."""
    scans: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(sweep_dir.glob(f"*/{SCAN_JSON}")):
        summary = json.loads(path.read_text())
        if int(summary.get("shards", 1)) > 1:
            scans.setdefault(scan_identity(summary), []).append(summary)
    return list(scans.values())


def merge(jobs: list[dict[str, Any]], out_dir: Path) -> tuple[dict[str, Any], dict[str, Path]] | None:
    """Write the merged outputs of one scan's shard jobs into ``out_dir``; None (and one line on stderr) when a
    shard is missing, since the merged figures would be those of part of the population."""
    shards = int(jobs[0]["shards"])
    found = {int(job["shard"]) for job in jobs}
    missing = sorted(set(range(shards)) - found)
    if missing:
        print(f"bdlab: scan shard(s) {', '.join(map(str, missing))} of {shards} wrote no {SCAN_JSON}; nothing merged "
              "(rerun the missing shards: the cache keeps what was scanned)", file=sys.stderr)
        return None
    first = jobs[0]
    meta = {key: first[key] for key in ("status", "source", "settings", "config")}
    meta.update(shard=None, shards=shards, seconds=sum(job.get("seconds", 0.0) for job in jobs),
                job_seconds=[job.get("seconds") for job in sorted(jobs, key=lambda job: job["shard"])])
    records = [row for job in jobs for row in job["records"]]
    return write_outputs(out_dir, records, first["scanners"], meta)


class MergeShards(Callback):
    """At the end of a ``-m`` scan, merge the shards of each sharded scan into the sweep folder (a sweep over
    other settings too: into ``merged_<n>/`` of the sweep folder, one per scan)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        scans = sharded_scans(sweep_dir)
        for number, jobs in enumerate(scans):
            out_dir = sweep_dir if len(scans) == 1 else sweep_dir / f"merged_{number}"
            merged = merge(jobs, out_dir)
            if merged is None:
                continue
            summary, pictures = merged
            logger_cfg = summary["config"].get("logger")
            log_to_loggers(OmegaConf.create(logger_cfg) if logger_cfg else None, out_dir, summary, pictures,
                           group=str(sweep_dir))
            print_summary(summary, out_dir)
        if not scans:
            print(f"sweep {sweep_dir}: each job's scan is in its own folder ({SCAN_CSV})")
