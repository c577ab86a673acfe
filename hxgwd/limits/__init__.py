"""Per-key usage limits: requests and tokens per minute, and a calendar budget in USD.

- `local`: the limiter of one host, in memory.
- `redis`: the same counters shared by every host in Redis, with `scripts` (its Lua).
- `seed`: budget counters raised to what the usage store recorded in the current periods.
"""
