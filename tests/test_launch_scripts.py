"""The launch scripts' command lines, run with stand-ins for the launchers on PATH (no SLURM or second node here):
one failed process ends the job rather than leaving its peers waiting in a collective."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny_cpu.yaml"


def _launched(tmp_path: Path, script: str, launcher: str, *args: str, **env: str) -> list[str]:
    """The arguments ``launch/<script>`` passes to ``launcher`` (a stand-in that records them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "args"
    for name, body in {launcher: f'printf "%s\\n" "$@" > {record}', "scontrol": "echo node-001; echo node-002"}.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    subprocess.run(["bash", str(ROOT / "launch" / script), RECIPE, *args], env=environ, cwd=ROOT, check=True,
                   timeout=30)
    return record.read_text().splitlines()


def test_slurm_ends_the_job_when_a_task_fails(tmp_path):
    args = _launched(tmp_path, "slurm.sbatch", "srun", "sla.topk=0.1", SLURM_JOB_NODELIST="node-[001-002]",
                     SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8")
    assert "--kill-on-bad-exit=1" in args[:args.index("python")], args
    assert args[args.index("python"):] == ["python", "-m", "sla_dist.cli", "train", RECIPE, "trainer.num_nodes=2",
                                           "trainer.devices=8", "sla.topk=0.1"]


def test_torchrun_never_restarts_a_failed_group(tmp_path):
    # torchrun takes its restart count from PET_MAX_RESTARTS when no flag is given
    args = _launched(tmp_path, "torchrun.sh", "torchrun", NNODES="2", NODE_RANK="1", NPROC="1",
                     PET_MAX_RESTARTS="3")
    flags = args[:args.index("-m")]
    assert flags[flags.index("--max-restarts") + 1] == "0", args
    assert args[args.index("-m"):] == ["-m", "sla_dist.cli", "train", RECIPE, "trainer.num_nodes=2",
                                       "trainer.devices=1"]
