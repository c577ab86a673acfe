"""Per-key usage limits: requests and tokens per minute, and a budget in USD per calendar day or
month (stage 4 of the request path: admit before routing, settle when the request ends).

- `estimate`: what a request may cost at most (reserved at admission), and what a usage cost.
- `reservation`: what an admission holds until it is settled; money in integer nano-USD.
- `refusal`: the 429 for the limit that binds.
- `periods`: the calendar day and month in `[limits] timezone`.
- `local`: one host's counters (sliding rpm / tpm windows, budget spend), pure.
- `redis`: the same counters shared by every host in Redis, one Lua script (`scripts`) per call.
- `limiter`: the interface the request path uses, and which of the two serves it.
- `seed`: budget counters raised to what the usage store recorded in the current periods.
"""
