# breakhis-ft as a container job: one run per container, configured by Hydra overrides.
#
#   docker build -t breakhis-ft .
#   docker run --gpus all -v /data/BreaKHis_v1:/data:ro -v $PWD/outputs:/outputs \
#     -v breakhis-cache:/cache -e HF_TOKEN -e WANDB_API_KEY \
#     breakhis-ft experiment=medgemma_lora_100x data.root=/data paths.output_dir=/outputs
#
# Without arguments it runs the CMD below: the tiny demo on the synthetic replica (no download, no
# secrets), a smoke test of the image. Secrets (HF_TOKEN, WANDB_API_KEY) come from the
# environment at run time and are never written into the image.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# PyPI's Linux torch wheel is the CUDA build (its CUDA libraries come as pip packages); to pick
# another CUDA build, pass e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
# optional extras of pyproject.toml: quant (bitsandbytes, for peft=qlora), plots (report plots)
ARG EXTRAS=quant,plots

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    BREAKHIS_FT_CACHE=/cache/breakhis_ft \
    WANDB_DIR=/outputs

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && pip install --upgrade pip

# torch in its own layer: the largest download, and it changes least often.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# A regular (non-editable) install: conf/ is packaged as breakhis_ft.conf, so the image needs no
# source tree at run time.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY breakhis_ft ./breakhis_ft
COPY conf ./conf
COPY scripts ./scripts
RUN pip install ".[${EXTRAS}]" && cd / && breakhis-ft experiment=demo --cfg job > /dev/null

# /data: the BreakHis tree (read-only); /outputs: run folders (and offline W&B files);
# /cache: image and embedding caches, hub downloads (keep it between jobs to skip them).
VOLUME ["/outputs", "/cache"]

ENTRYPOINT ["breakhis-ft"]
CMD ["experiment=demo", "logger=none", "paths.output_dir=/outputs"]
