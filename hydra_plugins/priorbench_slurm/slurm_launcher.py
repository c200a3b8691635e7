"""hydra/launcher=slurm: hydra-submitit-launcher's SLURM launcher with a bounded wait for lost jobs.

The plugin waits for each job's result file, asking `sacct` for the job's state. Without SLURM accounting sacct
fails, so a job that leaves the cluster without writing its result (cancelled, or killed outside its code) is never
seen to end, and the sweep polls forever. Here the sweep also asks `squeue`, which needs no accounting: a job
that is neither queued nor running and has no result for `lost_job_timeout_s` seconds is lost. The sweep then
waits for its other jobs and ends with one line per lost job, naming its SLURM id and point.
"""
from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as PluginSlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger("priorbench")


def queued_job_ids() -> tuple[set[str] | None, str]:
    """SLURM ids (array tasks as ARRAY_TASK) of this user's jobs that are pending, running, requeued or
    completing, or None and squeue's error when it fails (controller unreachable)."""
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if p.returncode != 0:
        return None, (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return set(p.stdout.split()), ""


def point_labels(job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """Each job's overrides that differ between the jobs of the sweep ("prior=ar T=2"): its point."""
    jobs = [dict(o.split("=", 1) for o in filter_overrides(list(ov)) if "=" in o) for ov in job_overrides]
    varying = [k for k in dict.fromkeys(k for j in jobs for k in j) if len({j.get(k) for j in jobs}) > 1]
    return [" ".join(f"{k}={j[k]}" for k in varying if k in j) or " ".join(f"{k}={v}" for k, v in j.items())
            for j in jobs]


class SlurmLauncher(PluginSlurmLauncher):
    def __init__(self, lost_job_timeout_s: float = 300, poll_s: float = 10, **params: Any) -> None:
        super().__init__(**params)
        self.lost_job_timeout_s = float(lost_job_timeout_s)
        self.poll_s = float(poll_s)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # The plugin's launch, up to its unbounded `[j.results()[0] for j in jobs]`.
        import submitit

        assert self.config is not None
        params = self.params
        init_params = {"folder": params["submitit_folder"], "slurm_max_num_timeout": params["max_num_timeout"]}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v for k, v in params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))

        lost = self.wait(jobs)
        if lost:
            labels = point_labels(job_overrides)
            for i in lost:
                j = jobs[i]
                line = (f"SLURM job {j.job_id} ({labels[i]}) left the queue without a result and stayed gone "
                        f"{self.lost_job_timeout_s:.0f}s (cancelled, or killed outside the job); its log: "
                        f"{j.paths.stderr}; rerunning the command resumes it")
                print(f"error: {line}", file=sys.stderr)
            sys.exit(1)
        return [j.results()[0] for j in jobs]

    def wait(self, jobs: Sequence[Any]) -> list[int]:
        """Until every job has its result file or is lost; returns the indices of the lost jobs. A squeue that
        fails for `lost_job_timeout_s` ends the sweep too: without it nothing tells a lost job from a running one."""
        gone_since: dict[int, float] = {}
        squeue_failing_since = None
        lost: list[int] = []
        while True:
            waiting = [i for i, j in enumerate(jobs) if i not in lost and not j.paths.result_pickle.exists()]
            if not waiting:
                return lost
            queued, problem = queued_job_ids()
            now = time.time()
            if queued is None:
                squeue_failing_since = squeue_failing_since or now
                if now - squeue_failing_since >= self.lost_job_timeout_s:
                    ids = ", ".join(str(jobs[i].job_id) for i in waiting)
                    print(f"error: squeue has failed for {self.lost_job_timeout_s:.0f}s ({problem}); SLURM jobs "
                          f"without a result: {ids}", file=sys.stderr)
                    sys.exit(1)
            else:
                squeue_failing_since = None
                for i in waiting:
                    if jobs[i].job_id in queued:
                        gone_since.pop(i, None)
                    elif now - gone_since.setdefault(i, now) >= self.lost_job_timeout_s:
                        if not jobs[i].paths.result_pickle.exists():  # it may have finished since the first look
                            lost.append(i)
            time.sleep(min(self.poll_s, max(1.0, self.lost_job_timeout_s / 4)))
