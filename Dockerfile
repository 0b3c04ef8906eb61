# GPU image: CUDA runtime base, the project installed, entry `python src/train.py`.
#   docker build -t monosemantic .
#   docker run --gpus all --ipc=host -v $PWD/data:/app/data -v $PWD/logs:/app/logs \
#       -e WANDB_API_KEY monosemantic experiment=sae_4096 trainer=gpu
#   (arguments after the image go to train.py, -m included: see README "Scaling up")
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PROJECT_ROOT=/app

# python3 + venv; linux-doc is the default training corpus (GPL-2.0 kernel documentation)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv linux-doc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned: on Linux x86_64 this release's default wheel is the CUDA build
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
# the optuna and slurm extras: hparams_search=sae_optuna and hydra/launcher=slurm work inside the image
# (DL3013 asks for pinned registry packages: this is the project itself, its pins in pyproject.toml)
# hadolint ignore=DL3013
RUN pip install ".[optuna,slurm]"

VOLUME ["/app/data", "/app/logs"]
ENTRYPOINT ["python", "src/train.py"]
CMD ["experiment=sae_4096", "trainer=gpu"]
