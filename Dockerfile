# breakhis-ft as a container job: one run, or one task's share of a sweep, per container, configured
# by Hydra overrides.
#
#   docker build -t breakhis-ft .
#   docker run --gpus all -v /data/BreaKHis_v1:/data:ro -v $PWD/outputs:/outputs \
#     -v breakhis-hf:/hf-cache -e HF_TOKEN -e WANDB_API_KEY \
#     breakhis-ft experiment=medgemma_lora_100x data.root=/data paths.output_dir=/outputs
#
# Without arguments it runs the CMD below: the tiny demo on the synthetic replica (no download, no
# secrets), a smoke test of the image. Secrets (HF_TOKEN, WANDB_API_KEY) come from the
# environment at run time and are never written into the image.
#
# One CUDA stack: a slim Python image (no CUDA of its own) and PyTorch's CUDA wheels, which carry
# their CUDA libraries as pip packages. The GPU driver comes from the host.
FROM python:3.12-slim

# The CUDA build of torch: Cloud Run's L4 GPUs run NVIDIA driver 535 (CUDA 12.2). PyPI's torch
# 2.13 wheel is built with CUDA 13, which needs driver 580 or newer; a CUDA 12 build runs on a
# 12.2 driver by CUDA's minor-version compatibility. On hosts with a newer driver (580+), pass
# --build-arg TORCH_INDEX_URL= for PyPI's wheel.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# optional extras of pyproject.toml: quant (bitsandbytes, for peft=qlora), plots (report plots),
# optuna (hparams_search=lora_optuna)
ARG EXTRAS=quant,plots,optuna

# HF_HOME: the Hugging Face cache on a mounted volume (/hf-cache), filled once and shared, so a
# task does not download 8 GB of weights into Cloud Run's in-memory disk.
# BREAKHIS_FT_CACHE: image, embedding and feature caches on the container's local disk (each
# task builds its own; on Cloud Run that disk is memory, counted in the task's --memory).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf-cache \
    BREAKHIS_FT_CACHE=/cache \
    WANDB_DIR=/outputs

# torch in its own layer: the largest download, and it changes least often.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# A regular (non-editable) install: conf/ is packaged as breakhis_ft.conf and the Hydra plugins
# (launcher=array) as hydra_plugins, so the image needs no source tree at run time.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY breakhis_ft ./breakhis_ft
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
COPY scripts ./scripts
RUN pip install ".[${EXTRAS}]" && cd / && breakhis-ft experiment=demo --cfg job > /dev/null

# /data: the BreakHis tree (read-only); /outputs: run and sweep folders (and offline W&B files);
# /hf-cache: the Hugging Face cache (HF_HOME). /cache stays on the container's own disk.
VOLUME ["/outputs", "/hf-cache"]

ENTRYPOINT ["breakhis-ft"]
CMD ["experiment=demo", "logger=none", "paths.output_dir=/outputs"]
