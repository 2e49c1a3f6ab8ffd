# Waypost: the supervisor and its mitmdump workers, mitmproxy 12 on the official (optimised)
# Python 3.12.
#   docker build -t waypost .
#   docker run -p 8080:8080 -p 9090:9090 waypost [--set option=value ...]
# Arguments after the image name go to mitmdump (through the supervisor, which starts
# server.workers of them). The profile comes from WAYPOST_PROFILE (default
# /app/profiles/prod.yaml; mount your own file and point the variable at it); environment
# variables (PROXY_PORT, LOG_LEVEL, ...: docs/configuration.md) override it. Give `docker stop -t`
# more than the profile's server.shutdown_timeout so in-flight requests can drain.

# --- build: a virtualenv with Waypost and mitmproxy 12, precompiled for PYTHONOPTIMIZE=1 ----------
FROM python:3.12.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/waypost
WORKDIR /src
COPY pyproject.toml ./
# The dependencies alone first (pyproject's [project] dependencies, markers kept), so this layer
# is rebuilt only when pyproject.toml changes, not on every change of the code. pyproject.toml
# pins mitmproxy exactly to the versions addons/kernel/patching.py checked: on Python 3.12 that
# is 12.3.1, which pins h11 0.16 (the CVE-2025-43859 fix).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/waypost/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY addons ./addons
# The package itself (its metadata gives waypost_build_info its version), then everything
# precompiled for -O.
RUN /opt/waypost/bin/pip install --no-cache-dir --no-deps . \
    && /opt/waypost/bin/python -O -m compileall -q /opt/waypost/lib

# --- runtime -------------------------------------------------------------------------------------
FROM python:3.12.12-slim-bookworm
# tini as PID 1 reaps the grandchildren of CLI commands (no `docker run --init` needed) and
# passes SIGTERM/SIGHUP on to the supervisor, which fans them out to its workers. Not `tini -g`:
# the workers would get every signal twice, and a second SIGTERM means "stop now" to a worker.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 waypost \
    && useradd --system --uid 10001 --gid waypost --home-dir /var/lib/waypost --create-home \
        --shell /usr/sbin/nologin waypost \
    && install -d -o waypost -g waypost -m 0700 /var/lib/waypost/mitmproxy
COPY --from=build /opt/waypost /opt/waypost
WORKDIR /app
COPY addons ./addons
COPY profiles ./profiles
RUN python -O -m compileall -q /app/addons

# PYTHONOPTIMIZE=1 skips mitmproxy's assert-based per-request checks (1.11x req/s measured);
# Waypost's own code never relies on assert. PYTHONPATH=/app makes `import addons` resolve to
# /app/addons, the same files the entrypoint script runs from (and whose ../profiles exist),
# ahead of the copy pip installed into the virtualenv.
ENV PATH=/opt/waypost/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONOPTIMIZE=1 \
    PYTHONUNBUFFERED=1 \
    WAYPOST_PROFILE=/app/profiles/prod.yaml

USER 10001:10001
EXPOSE 8080 9090

# Liveness through the proxy port (origin-form /health/liveness is answered by Waypost itself),
# on the port the profile and the environment give (WAYPOST_PROFILE, PROXY_PORT, ...), resolved
# as the proxy resolves it; non-2xx or no answer within 4 s = unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "addons.schema.probe", "liveness"]

# The confdir (mitmproxy's CA and config.yaml) must be writable by the non-root user. With one
# worker the supervisor execs mitmdump in its place: tini's child is then mitmdump itself.
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "addons.supervisor", "-s", "/app/addons/bundle.py", "--set", "confdir=/var/lib/waypost/mitmproxy"]
