# fraudscore scorer / simulator image (used by docker-compose.yml).
FROM python:3.11-slim

# lightgbm's wheel links against OpenMP (libgomp), which the slim image lacks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/fraudscore

# Dependencies first, from pyproject.toml alone, so editing code does not
# re-download them: install the deps with a stub package, then the real one.
COPY pyproject.toml README.md ./
RUN mkdir -p app features models \
 && touch app/__init__.py features/__init__.py models/__init__.py \
 && pip install . \
 && pip uninstall -y fraudscore \
 && rm -rf app features models build *.egg-info

COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

# Never run the service as root; it may write under its working directory.
RUN useradd --system --uid 10001 --home-dir /srv/fraudscore fraudscore \
 && chown fraudscore /srv/fraudscore
USER fraudscore

# `docker run IMAGE` runs the scorer; `docker run IMAGE simulate ...` other commands.
ENTRYPOINT ["fraudscore"]
CMD ["run"]
