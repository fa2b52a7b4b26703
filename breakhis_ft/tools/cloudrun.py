"""Print the Cloud Run job that runs a sweep: `gcloud run jobs deploy` with one task per job.

breakhis-ft-cloudrun breakhis-sweep --image REGION-docker.pkg.dev/PROJECT/REPO/breakhis-ft:TAG \\
    --data-bucket MY_DATA --output-bucket MY_OUTPUTS --hf-cache-bucket MY_HF_CACHE -- \\
    experiment=medgemma_lora_100x data.root=/data/BreaKHis_v1 logger.mode=online \\
    peft.r=4,8 trainer.lr=1e-4,2e-4

The overrides after `--` are the sweep's, as `breakhis-ft -m` takes them; the job's tasks run
`breakhis-ft -m launcher=array <overrides> paths.output_dir=/outputs`, task i running jobs i, i+n,
... into one sweep folder named after the execution (outputs/sweeps/<experiment>/<execution>/).
The number of tasks is the sweep's number of jobs, from the entrypoint's own plan of it
(hydra.launcher.plan_only). The command is printed, never run; then
`gcloud run jobs execute NAME --region REGION`, and read the sweep with breakhis-ft-report.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from breakhis_ft.run.cloud_run_job import (
    CloudRunJob,
    CloudRunJobError,
    count_jobs,
    deploy_command,
    shell_lines,
    sweep_args,
)
from breakhis_ft.tools import run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-cloudrun", __doc__)
    parser.add_argument("name", help="the Cloud Run job's name")
    parser.add_argument("overrides", nargs="+", help="the sweep's overrides (after --)")
    parser.add_argument("--image", required=True, help="the image (docker build of Dockerfile)")
    parser.add_argument("--region", default="us-central1", help="a region with Cloud Run GPUs")
    parser.add_argument("--data-bucket", required=True, help="bucket mounted read-only at /data")
    parser.add_argument("--output-bucket", required=True, help="bucket mounted at /outputs")
    parser.add_argument(
        "--hf-cache-bucket",
        help="bucket holding the Hugging Face cache, mounted read-only at /hf-cache (HF_HOME) "
        "with HF_HUB_OFFLINE=1; without it every task downloads the weights",
    )
    parser.add_argument("--tasks", type=int, help="number of tasks (default: one per job)")
    parser.add_argument(
        "--parallelism", type=int, default=3, help="tasks at once (your GPU quota; default 3)"
    )
    parser.add_argument("--gpu-type", default="nvidia-l4", help="Cloud Run GPU type")
    parser.add_argument("--cpu", default="8", help="CPUs per task (an L4 needs at least 4)")
    parser.add_argument("--memory", default="32Gi", help="memory per task (L4: 16Gi or more)")
    parser.add_argument("--task-timeout", default="24h", help="longest a task may run")
    parser.add_argument(
        "--max-retries", type=int, default=3, help="retries of a failed task (it resumes)"
    )
    parser.add_argument("--hf-token-secret", default="hf-token", help="Secret Manager: HF_TOKEN")
    parser.add_argument(
        "--wandb-secret", default="wandb-api-key", help="Secret Manager: WANDB_API_KEY"
    )
    parser.add_argument(
        "--sweep-name",
        help="the sweep folder's name in every execution (default: the execution's name); a "
        "new execution then finishes the same sweep",
    )
    return parser


def cloudrun(args: argparse.Namespace) -> int:
    """Count the sweep's jobs and print the deploy command and the next steps."""
    container_args = sweep_args(args.overrides, args.sweep_name)
    n_jobs = count_jobs(container_args)
    tasks = args.tasks or n_jobs
    if not 1 <= tasks <= n_jobs:
        raise CloudRunJobError(f"--tasks {tasks}: the sweep has {n_jobs} jobs; give 1 to {n_jobs}")
    if args.parallelism < 1:
        raise CloudRunJobError(f"--parallelism {args.parallelism}: give at least 1")
    # every field of the job has an option of the same name
    job = CloudRunJob(**{f.name: getattr(args, f.name) for f in fields(CloudRunJob)})
    command = deploy_command(job, container_args, tasks, min(args.parallelism, tasks))
    print(f"# the sweep has {n_jobs} jobs: {tasks} tasks, {min(args.parallelism, tasks)} at once")
    print(shell_lines(command))
    print(f"# then: gcloud run jobs execute {args.name} --region {args.region}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the Cloud Run job of a sweep; 0 on success."""
    return run_tool(build_parser(), cloudrun, argv, (CloudRunJobError,))


if __name__ == "__main__":
    raise SystemExit(main())
