"""breakhis-ft-cloudrun prints the Cloud Run job of a sweep, with one task per job of the sweep as
the entrypoint expands it; the image it runs has one CUDA stack and its caches where the job
mounts them (issue 24)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from breakhis_ft.run.cloud_run_job import HF_CACHE_MOUNT, OUTPUTS_MOUNT
from breakhis_ft.tools import cloudrun

REPO = Path(__file__).resolve().parent.parent


def _flags(printed: str) -> dict[str, list[str]]:
    """The printed gcloud command's flags: name -> the values it was given."""
    words = shlex.split(printed.replace("\\\n", " "), comments=True)
    assert words[:5] == ["gcloud", "run", "jobs", "deploy", "bsweep"], words[:5]
    flags: dict[str, list[str]] = {}
    for word in words[5:]:
        name, _, value = word.removeprefix("--").partition("=")
        flags.setdefault(name, []).append(value)
    return flags


def test_the_deploy_command_runs_one_task_per_job_of_the_sweep(capsys) -> None:
    # hparams_search=lora_rank_lr is a 3 x 3 grid; seed=1,2 doubles it: 18 jobs
    sweep = ["experiment=demo", "hparams_search=lora_rank_lr", "seed=1,2", "logger.mode=online"]
    argv = ["bsweep", "--image", "img:1", "--data-bucket", "d", "--output-bucket", "o"]
    argv += ["--hf-cache-bucket", "h", "--parallelism", "5", "--", *sweep]
    assert cloudrun.main(argv) == 0
    printed = capsys.readouterr().out
    flags = _flags(printed)
    assert flags["tasks"] == ["18"] and flags["parallelism"] == ["5"]
    assert flags["gpu"] == ["1"] and flags["gpu-type"] == ["nvidia-l4"]
    assert flags["cpu"] == ["8"] and flags["memory"] == ["32Gi"]
    assert flags["task-timeout"] == ["24h"] and flags["max-retries"] == ["3"]
    assert flags["set-secrets"] == ["HF_TOKEN=hf-token:latest,WANDB_API_KEY=wandb-api-key:latest"]
    assert flags["set-env-vars"] == ["HF_HUB_OFFLINE=1"]
    assert flags["add-volume"] == [
        "name=data,type=cloud-storage,bucket=d,readonly=true",
        "name=outputs,type=cloud-storage,bucket=o",
        "name=hf-cache,type=cloud-storage,bucket=h,readonly=true",
    ]
    assert flags["add-volume-mount"] == [
        "volume=data,mount-path=/data",
        f"volume=outputs,mount-path={OUTPUTS_MOUNT}",
        f"volume=hf-cache,mount-path={HF_CACHE_MOUNT}",
    ]
    (args,) = flags["args"]
    delimiter = re.fullmatch(r"\^(.)\^.*", args, re.S).group(1)  # gcloud's alternate delimiter
    assert args[3:].split(delimiter) == [
        "-m",
        "launcher=array",
        *sweep,
        f"paths.output_dir={OUTPUTS_MOUNT}",
    ]
    assert "# the sweep has 18 jobs" in printed


def test_a_sweep_that_does_not_compose_is_refused(capsys) -> None:
    argv = ["bsweep", "--image", "i", "--data-bucket", "d", "--output-bucket", "o", "--"]
    try:
        cloudrun.main([*argv, "peft.r=4,8", "no_such_key=1"])
    except SystemExit as err:
        assert "the sweep's plan failed" in str(err) and "no_such_key" in str(err)
    else:
        raise AssertionError("a sweep with an unknown key was planned")
    assert "gcloud" not in capsys.readouterr().out


def test_the_image_has_one_cuda_stack_and_the_caches_where_the_job_mounts_them() -> None:
    lines = [
        line.strip()
        for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    (base,) = [line for line in lines if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.\d+-slim", base), base  # no CUDA base image
    env = dict(re.findall(r"(\w+)=(\S+)", next(line for line in lines if line.startswith("ENV "))))
    assert env["HF_HOME"] == HF_CACHE_MOUNT  # the Hugging Face cache on the job's volume
    cache = env["BREAKHIS_FT_CACHE"]
    assert not cache.startswith((HF_CACHE_MOUNT, OUTPUTS_MOUNT, "/data"))  # on local disk
    # Cloud Run's L4 driver (535, CUDA 12.2) runs CUDA 12 wheels, not PyPI's CUDA 13 torch
    index = next(line for line in lines if line.startswith("ARG TORCH_INDEX_URL="))
    assert re.search(r"/whl/cu12\d$", index), index
    assert "COPY hydra_plugins ./hydra_plugins" in lines  # launcher=array in the image
    assert "!hydra_plugins/" in (REPO / ".dockerignore").read_text().splitlines()
