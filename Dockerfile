# One image for every node of a geovq Ray cluster, head and GPU workers, under `ray up` (cluster.yaml) and KubeRay
# (k8s/raycluster.yaml) alike: this checkout's geovq, PyTorch built for CUDA 13.0, Ray with its dashboard and
# autoscaler, and what Ray's Docker runner and KubeRay's probes call inside a container (bash, rsync, ssh, wget).
#
# Build and push from the repository root. Replace registry.example.com with your registry (for example
# 123456789012.dkr.ecr.us-west-2.amazonaws.com or ghcr.io/your-org); cluster.yaml and k8s/raycluster.yaml name
# the same string, and the tag is geovq's version (pyproject.toml):
#   docker build -t registry.example.com/geovq:0.1.0 .
#   docker push registry.example.com/geovq:0.1.0
#
# The CUDA runtime, cuBLAS and cuDNN come inside PyTorch's CUDA wheels, so the base image only brings the hookup
# to the host's driver (NVIDIA container toolkit). Nodes need an NVIDIA driver for CUDA 13.0 (>= 580).
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

LABEL org.opencontainers.image.title="geovq" org.opencontainers.image.version="0.1.0"

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 LC_ALL=C.UTF-8 LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Python in a venv (Ubuntu's own is externally managed); Ray's Docker runner uses login shells, which read
# /etc/profile.d, so they get the venv too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv rsync openssh-client wget sudo ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && echo "export PATH=$VIRTUAL_ENV/bin:\$PATH" > /etc/profile.d/geovq-venv.sh

# PyTorch first, from its CUDA 13.0 wheel index (inside pyproject.toml's range), so that `pip install` below keeps it.
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu130

# geovq with its pinned Ray; Ray's `default` extra is the dashboard and autoscaler, boto3 what the head's AWS
# autoscaler launches nodes with.
COPY . /opt/geovq
RUN pip install /opt/geovq "ray[default]>=2.60,<2.61" boto3 \
    && python -c "import geovq, ray, torch; print('geovq on torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" \
    && python -c "from geovq.cli import SPACES_DIR; assert (SPACES_DIR / 'digits.yaml').is_file(), SPACES_DIR"

WORKDIR /root
