"""``SweepSummary``: at the end of a multirun, one table of every job's SAEs (``hydra.callbacks`` in
``configs/hydra/default.yaml``), so a sweep ends with its results side by side, not in N scrolled-away logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _job_overrides(job_dir: Path, output_subdir: str | None) -> list[str]:
    f = job_dir / (output_subdir or ".hydra") / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(f)] if f.is_file() else []


class SweepSummary(Callback):
    """Writes ``<sweep dir>/sweep.md`` and ``sweep.json``: a row per SAE the jobs trained (a job of
    ``experiment=sae_sweep`` adds one per SAE), named by the job folder and the overrides the jobs differ in.
    A sweep of transformer jobs (no SAE metrics) writes nothing."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from monosemantic.frontier import collect
        from monosemantic.stages.summary import print_sweep_table

        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: (len(p.name), p.name)) if sweep_dir.is_dir() else []
        subdir = config.hydra.get("output_subdir")
        overrides = {job: _job_overrides(job, subdir) for job in jobs}
        common = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
        rows = []
        for job in jobs:
            try:
                found = collect([job])
            except FileNotFoundError:  # a failed job, or one that trains no SAE
                continue
            differs = ",".join(o for o in overrides[job] if o not in common)
            for row in found:
                sub = row["name"] if row["name"] != job.name else ""
                row["name"] = " ".join(x for x in (job.name, f"[{differs}]" if differs else "", sub) if x)
                row["metrics"] = str(Path(row["metrics"]).relative_to(sweep_dir))
                rows.append(row)
        if not rows:
            log.info("sweep %s: no job wrote SAE metrics; no sweep table", sweep_dir)
            return
        print_sweep_table(rows, sweep_dir / "sweep.md", title=f"multirun {sweep_dir.name} — held-out metrics")
