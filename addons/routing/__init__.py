"""The router addon's package; `addons/router.py` is its entry (`-s addons/router.py`).

router    the Router addon: hooks that pick the backend, account outcomes, retry
options   the option table; routes and backends built from the options
balance   pure decisions: rule matching, pools, circuit breaker, health, retry budget, backoff
retry     the patches of mitmproxy's HttpStream that let a failed request go to another backend
health    active health checks; the health and circuit log lines
admin     GET /admin/backends and the readiness check's backend states
stats     the process's one metrics collector for backends
shared    circuit breakers shared by every process through Redis (state_backend redis)
"""
