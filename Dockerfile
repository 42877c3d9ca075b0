# mtrl_ntk training image: CUDA PyTorch, Meta-World/MuJoCo with headless (EGL) rendering.
#
#   docker build -t mtrl-ntk \
#     --build-arg GIT_COMMIT="$(git rev-parse HEAD)$(test -z "$(git status --porcelain)" || echo -dirty)" .
#   mkdir -p runs
#   docker run --gpus all -v "$PWD/runs:/runs" mtrl-ntk combiner=ntkmtl seed=3
#
# Base: python:3.11-slim, not nvidia/cuda. torch 2.13.0's Linux wheel on PyPI is the CUDA 13
# build and brings the CUDA user-space libraries as pip packages, pinned in
# requirements-cuda.lock; all it needs from outside is the host's NVIDIA driver (>= 580), which
# the NVIDIA container toolkit mounts at `docker run --gpus`. A CUDA base image would add a
# second copy of those libraries. Python 3.11 is the version the locks are resolved for.
FROM python:3.11-slim-bookworm

# MuJoCo with MUJOCO_GL=egl loads libEGL (glvnd) when it is imported and libOpenGL when it
# renders. The NVIDIA EGL driver is mounted by the container toolkit when
# NVIDIA_DRIVER_CAPABILITIES contains "graphics"; the vendor file lets glvnd find it. Training
# itself never renders: without a GPU, import and simulation still work, only rendering fails.
# Debian revisions are not pinned (DL3008): the base tag fixes the release (bookworm), and
# security updates remove superseded revisions from the archive, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libegl1 libopengl0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /usr/share/glvnd/egl_vendor.d \
    && printf '%s\n' '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}' \
        > /usr/share/glvnd/egl_vendor.d/10_nvidia.json

# The runs volume belongs to a non-root user, numeric so that the host and orchestrators
# (runAsNonRoot) can tell it is not root.
RUN groupadd --gid 1000 mtrl \
    && useradd --create-home --no-log-init --uid 1000 --gid 1000 mtrl \
    && mkdir -p /runs \
    && chown 1000:1000 /runs

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    MTRL_NTK_RUNS_DIR=/runs

WORKDIR /opt/mtrl_ntk

# The pinned dependencies get their own layer: it is rebuilt only when the lock changes.
# The default is the CUDA image. A CPU image (what CI builds: scripts/check_image.py) takes the
# CPU lock and a CPU build of torch 2.13.0 from PyTorch's index or a local wheel directory:
#   --build-arg REQUIREMENTS=requirements.lock \
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# (or --volume DIR:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels with podman/buildah).
ARG REQUIREMENTS=requirements-cuda.lock
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
COPY requirements.lock requirements-cuda.lock ./
RUN pip install --no-cache-dir -r "${REQUIREMENTS}"

COPY . .
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && pip check

# Last, so that a new commit rebuilds no layer above. Read by mtrl_ntk.provenance,
# since the image has no .git: a 40-hex commit, "-dirty" appended for uncommitted changes.
ARG GIT_COMMIT=""
ENV MTRL_NTK_GIT_COMMIT=${GIT_COMMIT}

USER 1000:1000
VOLUME ["/runs"]

ENTRYPOINT ["python", "run_mt10.py"]
