# birdcli on CPU: a slim Python with CPU-only torch (a CUDA build would add ~3 GB that a CPU never uses).
#   docker build -t birds .
#   docker run --rm birds                                    # birds --help
#   docker run --rm -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" birds train --exp smoke
# Data and credentials come at run time (mounted volumes, `birds data fetch`, `dvc pull`, environment variables),
# never at build time: .dockerignore sends only pyproject.toml, README.md and birdcli/ to the builder.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLCONFIGDIR=/tmp/matplotlib

# 1. torch and torchvision from the PyTorch CPU index; this layer changes only when these pins do.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# 2. every other dependency, from pyproject.toml alone: a stub package stands in for the source, so editing the
#    code reuses this layer. The torch installed above already satisfies pyproject's pin and stays. (DL3013 wants
#    pins on the command line; here they are pyproject.toml's.)
WORKDIR /src
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN mkdir birdcli \
    && echo '__version__ = "0"' > birdcli/__init__.py \
    && touch README.md \
    && pip install ".[onnx,serve]" \
    && pip uninstall --yes birdcli \
    && rm -rf birdcli README.md build ./*.egg-info

# 3. the source, installed (not editable) without touching the dependencies; the configs ship inside the package.
COPY README.md ./
COPY birdcli ./birdcli
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# 4. an unprivileged user; /work is the working directory, with data/ and runs/ meant as mounted volumes.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin birds \
    && mkdir -p /work/data /work/runs \
    && chown -R birds:birds /work
USER 1000:1000
WORKDIR /work

# `birds serve` listens here.
EXPOSE 8000
ENTRYPOINT ["birds"]
CMD ["--help"]
