"""The pieces the router is made of, each pure (no I/O, no clock, no global randomness).

- `estimator`: what is learned from finished requests: a latency model per deployment (recursive
  least squares with forgetting, in its Kalman form), decaying error / 429 rates, output lengths.
- `breaker`: passive health per deployment: closed -> open -> half-open, plus Retry-After cooling.
- `state`: all of the above for one deployment, its in-flight accounting, and how one finished
  attempt updates it.
- `strategies`: how candidates are ordered: priority, weighted, least-busy, least-latency, scored.

`hxgwd.pipeline.route.Router` is the facade the request path calls; it owns one state record per
deployment id and hands these modules the numbers they need.
"""
