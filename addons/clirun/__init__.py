"""The CLI streaming package behind `addons/cli.py` (`POST /cli/execute`), one job per module.

plan      pure: the allowlist, argument rules, environment filter, limits -> a Plan or a Refusal
options   the `cli_` options table and its parsing into Settings
runner    one process: spawned under its limits in its own process group, killed as a group
stream    the request body in (request object, stdin lines), NDJSON or one JSON object out
endpoint  the HTTP endpoint: token check, refusals, concurrency cap, one execution's life
listener  the loopback listener proxy-port requests are rerouted to
stats     the metrics collector, registered once per process
addon     the mitmproxy hooks
"""
