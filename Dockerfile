# bids-group BIDS-App image.
#   docker build -t bids-group .
#   docker run --rm -v /data/ds:/data:ro -v /data/out:/out bids-group /data /out group
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY bids_group ./bids_group
RUN pip install --no-cache-dir . && rm -rf /src

# Run as an unprivileged user; the input is expected read-only, the output writable.
RUN useradd --create-home --uid 1000 bids
USER bids
WORKDIR /tmp
ENTRYPOINT ["bids-group"]
CMD ["--help"]
