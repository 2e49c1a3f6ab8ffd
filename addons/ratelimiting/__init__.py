"""Rate limiting's parts, behind `addons/ratelimit.py` (the addon: options, hooks, metrics).

bucket  the token bucket (`take`), limits and rules, the bounded per-client table, a worker's share
bans    temporary bans in memory; in Redis the bucket script (token, ban check and violation
        count in one round trip), the ban index, lifting
"""
