"""A sweep as a Cloud Run job: the `gcloud run jobs deploy` command whose N tasks each run their
share of the sweep (launcher=array), N being the sweep's number of jobs as Hydra expands it.

The number comes from the entrypoint itself (`hydra.launcher.plan_only=true` into a temporary
folder): the same expansion, composition and checks as the tasks will make. Nothing here runs
gcloud: the command is printed for the user to run.

The container's volumes (the image sets HF_HOME and BREAKHIS_FT_CACHE; docs/clusters.md):
  /data      the BreakHis bucket, read-only
  /outputs   the output bucket: the sweep folder every task writes into
  /hf-cache  the Hugging Face cache bucket (HF_HOME), filled once, read-only in the sweep's tasks
             (HF_HUB_OFFLINE=1), so no task downloads the weights into its in-memory disk
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from breakhis_ft.run.array import PLAN_FILE

DATA_MOUNT, OUTPUTS_MOUNT, HF_CACHE_MOUNT = "/data", "/outputs", "/hf-cache"
# gcloud splits a list flag's value at commas, which sweeps use (peft.r=4,8): `^D^` before the
# value makes D the delimiter instead (gcloud topic escaping); the first of these absent from it
_DELIMITERS = ("@", "|", "~", ";", "#")
# scheduler variables a plan must not read from this shell (it is drawn for the job's tasks)
_SCHEDULER_PREFIXES = ("CLOUD_RUN_", "SLURM_", "AWS_BATCH_", "JOB_COMPLETION_INDEX")


class CloudRunJobError(ValueError):
    """A sweep or an option the Cloud Run job cannot be made of; the message says why."""


@dataclass(frozen=True)
class CloudRunJob:
    """What the job runs on: the image, the region, a task's machine and limits, the buckets and
    the Secret Manager secrets handed to it."""

    name: str
    image: str
    data_bucket: str
    output_bucket: str
    hf_cache_bucket: str | None = None
    region: str = "us-central1"
    gpu_type: str = "nvidia-l4"
    cpu: str = "8"
    memory: str = "32Gi"
    task_timeout: str = "24h"
    max_retries: int = 3  # a failed task is started again this often (it skips finished jobs)
    hf_token_secret: str = "hf-token"  # Secret Manager names of HF_TOKEN and WANDB_API_KEY
    wandb_secret: str = "wandb-api-key"


def sweep_args(overrides: list[str], sweep_name: str | None = None) -> list[str]:
    """The container's arguments: an array sweep of `overrides` writing under /outputs."""
    if any(o.startswith(("-m", "--multirun", "launcher=")) for o in overrides):
        raise CloudRunJobError(
            "give the sweep's overrides only (peft.r=4,8 ...): -m and launcher=array are added"
        )
    args = ["-m", "launcher=array", *overrides]
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        args.append(f"paths.output_dir={OUTPUTS_MOUNT}")
    if sweep_name is not None:
        args.append(f"hydra.launcher.sweep_name={sweep_name}")
    return args


def count_jobs(args: list[str]) -> int:
    """The sweep's number of jobs: the entrypoint's plan of `args` (launcher=array's
    plan_only), drawn in a temporary folder; its error message when the sweep does not compose."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCHEDULER_PREFIXES)}
    with tempfile.TemporaryDirectory(prefix="breakhis-ft-plan-") as tmp:
        plan_args = [
            *args,
            "hydra.launcher.plan_only=true",
            "hydra.launcher.sweep_name=plan",
            f"hydra.sweep.dir={tmp}",
        ]
        done = subprocess.run(
            [sys.executable, "-m", "breakhis_ft", *plan_args],
            env=env,
            capture_output=True,
            text=True,
        )
        plan = Path(tmp) / PLAN_FILE
        if done.returncode != 0 or not plan.is_file():
            raise CloudRunJobError(
                f"the sweep's plan failed (breakhis-ft {shlex.join(plan_args)}):\n"
                f"{done.stderr.strip()[-2000:]}"
            )
        return int(json.loads(plan.read_text())["n_jobs"])


def _list_flag(name: str, values: list[str]) -> str:
    """`--name=v1,v2,...`, with gcloud's alternate delimiter when a value holds a comma."""
    joined = ",".join(values)
    if not any("," in v for v in values):
        return f"--{name}={joined}"
    delimiter = next((d for d in _DELIMITERS if not any(d in v for v in values)), None)
    if delimiter is None:
        raise CloudRunJobError(f"--{name}: no delimiter free of the values {values}")
    return f"--{name}=^{delimiter}^{delimiter.join(values)}"


def deploy_command(job: CloudRunJob, args: list[str], tasks: int, parallelism: int) -> list[str]:
    """`gcloud run jobs deploy` of `job` with `tasks` tasks (`parallelism` at a time) running
    `args`: one L4 GPU each, the buckets mounted, the secrets from Secret Manager."""
    command = ["gcloud", "run", "jobs", "deploy", job.name, f"--image={job.image}"]
    command += [f"--region={job.region}", f"--tasks={tasks}", f"--parallelism={parallelism}"]
    command += [f"--task-timeout={job.task_timeout}", f"--max-retries={job.max_retries}"]
    command += ["--gpu=1", f"--gpu-type={job.gpu_type}", "--no-gpu-zonal-redundancy"]
    command += [f"--cpu={job.cpu}", f"--memory={job.memory}"]
    secrets = f"HF_TOKEN={job.hf_token_secret}:latest,WANDB_API_KEY={job.wandb_secret}:latest"
    command.append(f"--set-secrets={secrets}")
    volumes = [
        ("data", job.data_bucket, DATA_MOUNT, True),
        ("outputs", job.output_bucket, OUTPUTS_MOUNT, False),
    ]
    if job.hf_cache_bucket:
        volumes.append(("hf-cache", job.hf_cache_bucket, HF_CACHE_MOUNT, True))
        command.append("--set-env-vars=HF_HUB_OFFLINE=1")  # the cache holds the weights
    for name, bucket, mount, readonly in volumes:
        spec = f"name={name},type=cloud-storage,bucket={bucket}"
        command.append(f"--add-volume={spec}{',readonly=true' if readonly else ''}")
        command.append(f"--add-volume-mount=volume={name},mount-path={mount}")
    command.append(_list_flag("args", args))
    return command


def shell_lines(command: list[str]) -> str:
    """The command as shell text, one flag per line."""
    first = command.index(next(a for a in command if a.startswith("--")))
    lines = [shlex.join(command[:first]), *(shlex.quote(a) for a in command[first:])]
    return " \\\n    ".join(lines)
