# bids-group BIDS-App image.
#   docker build -t bids-group .
#   docker run --rm -v /data/ds:/data:ro -v /data/out:/out bids-group /data /out group
# BASE: any Debian-like image with Python >= 3.10 and pip on PATH. CI has no registry and builds
# on a local Debian bookworm image made with debootstrap (.ci/build-image.sh --build-arg BASE=...).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# BIDS_GROUP_NUMBA_SEED: the permutation kernels compiled below (read-only, root-owned). At run
# time a user whose numba cache is empty starts from a copy of them in their private cache
# folder instead of compiling (~30 s); bids_group/inference/_numba_cache.py.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp \
    BIDS_GROUP_NUMBA_SEED=/usr/local/share/bids-group/numba

WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY bids_group ./bids_group
COPY examples/ds-faces ./examples/ds-faces
COPY configs/two_sample_age.yaml configs/one_sample.yaml ./configs/
# Install, then compile every permutation kernel once into the seed folder, which is then made
# read-only: permutation and sign-flip designs, voxel alone and with cluster/TFCE (the kernels'
# argument layouts differ). numba keys its cache by CPU: on a CPU unlike the build machine's the
# kernels are compiled at run time, as without the seed.
RUN pip install --no-cache-dir ".[fast,dask]" \
 && for model in two_sample_age one_sample; do \
      for methods in voxel "voxel cluster tfce"; do \
        NUMBA_CACHE_DIR="$BIDS_GROUP_NUMBA_SEED" bids-group examples/ds-faces /tmp/warm group \
          --model "configs/$model.yaml" --permutation $methods --n-perm 10 --no-report -q \
          --overwrite > /tmp/warm.log 2>&1 || { cat /tmp/warm.log; exit 1; }; \
      done; \
    done \
 && chmod -R a-w,a+rX "$BIDS_GROUP_NUMBA_SEED" \
 && cd / && rm -rf /src /tmp/warm /tmp/warm.log /tmp/matplotlib

# Run as an unprivileged user; the input is expected read-only, the output writable.
RUN useradd --create-home --uid 1000 bids
USER bids
WORKDIR /tmp
ENTRYPOINT ["bids-group"]
CMD ["--help"]
