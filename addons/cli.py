"""CLI streaming: `POST /cli/execute` runs allow-listed programs and streams their output.

A remote-execution endpoint, secure first: off unless `cli_enabled` and a token are set,
bearer-token auth, an allowlist of absolute paths, no shell ever, a filtered environment, and
limits on every process (time, memory, CPU, file size, processes, output, concurrency). It
answers on the management port and on the proxy port (addressed to the proxy itself, or on a
reverse listener). The code is the `addons/clirun/` package; this file lets
`mitmdump -s addons/cli.py` load it alone.

Hooks: load, configure, running, done (the loopback listener), requestheaders (reroute to it),
responseheaders (stream). Extension: management_routes().
Options (all `cli_`): enabled, token (else env CLI_TOKEN), allowed_commands, argument_rules
(JSON), env_allowlist, max_concurrent, process_timeout, grace_period, max_memory_per_process,
max_cpu_time, max_file_size, max_processes, max_output_bytes, working_directory, run_as_user,
heartbeat_interval.
Metrics: cli_processes (gauge), cli_executions_total{command,outcome}.
"""

from __future__ import annotations

from addons.clirun.addon import Cli

addons = [Cli()]
