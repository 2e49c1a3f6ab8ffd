# Waypost: mitmdump + the Waypost bundle, mitmproxy 12 on the official (optimised) Python 3.12.
#   docker build -t waypost .
#   docker run --init -p 8080:8080 -p 9090:9090 waypost [--set option=value ...]
# Arguments after the image name go to mitmdump. The profile comes from WAYPOST_PROFILE
# (default /app/profiles/prod.yaml; mount your own file over it or point the variable at it);
# environment variables (PROXY_PORT, LOG_LEVEL, ...: docs/configuration.md) override it.
# `--init` reaps the grandchildren of CLI commands; give `docker stop -t` more than the
# profile's server.shutdown_timeout so in-flight requests can drain.

# --- build: a virtualenv with Waypost and mitmproxy 12, precompiled for PYTHONOPTIMIZE=1 ----------
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/waypost
WORKDIR /src
COPY pyproject.toml ./
COPY addons ./addons
# pyproject.toml pins mitmproxy exactly to the versions addons/kernel/patching.py checked: on
# Python 3.12 that is 12.3.1, which pins h11 0.16 (the CVE-2025-43859 fix).
RUN /opt/waypost/bin/pip install --no-cache-dir . \
    && /opt/waypost/bin/python -O -m compileall -q /opt/waypost/lib

# --- runtime -------------------------------------------------------------------------------------
FROM python:3.12-slim
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

# Liveness through the proxy port (origin-form /health/liveness is answered by Waypost itself).
# No curl in slim: Python's urllib, with environment proxies ignored; non-2xx or no answer = 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health/liveness' % os.environ.get('PROXY_PORT', '8080'), timeout=4)"]

# The confdir (mitmproxy's CA and config.yaml) must be writable by the non-root user.
ENTRYPOINT ["mitmdump", "-s", "/app/addons/bundle.py", "--set", "confdir=/var/lib/waypost/mitmproxy"]
