"""What the scored strategy learns from finished requests, with no tokenizer on the request path.

Latency model
-------------
A request's time to finish on one deployment is modelled as linear in what is known of it:

    duration ~ th0 + th1*kb + th3*c  +  out * (th2 + th4*c)
               \_ time to first token _/    \_ decoding _/

kb: the prompt's size in KiB (bytes stand in for tokens); out: output tokens, in thousands; c: the
other requests on the deployment at the same time (at most its concurrency cap: requests waiting
at the gateway do not load the upstream). th0 is the fixed part (network, the provider's own
queue), th1 the prefill cost per KiB, th2 seconds per 1000 output tokens, th3 and th4 how much each
concurrent request slows the first token and the decoding (continuous batching shares the GPU).

The same model, fitted separately on streams' time to the response head (out = 0), is the learned
time to first byte; it is shown, not used to route. At plan time the output length is unknown:
`OutputLength` predicts it from max_tokens, and as the model is linear in `out`, plugging in that
expectation gives the expected duration.

Fit: recursive least squares in its covariance (Kalman) form, where th is a slowly drifting state:
- exponential forgetting per observation (LAMBDA) tracks drift under steady traffic;
- process noise per second of silence makes an unobserved deployment's estimate uncertain again,
  which is what draws exploration back to a deployment after an outage or a quiet spell;
- each variance is capped at the prior's, so a long silence cannot wind the covariance up;
- observation noise is relative (variance ~ prediction^2): latencies are closer to log-normal
  than to constant-variance, so a 60 s request's 6 s error weighs like a 0.6 s request's 60 ms;
- innovations are clipped at 3 sigma once a few requests are in, so one stuck request does not
  wreck the fit.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs

N = 5
# Prior variances of th (seconds^2 in the units above). The prior mean is 0; `strategies` replaces
# an unmeasured deployment's mean by its peers', so "unknown" reads as "like the others, unsure".
PRIOR_VAR = (4.0, 0.25, 400.0, 0.25, 25.0)
LAMBDA = 0.99                  # forgetting per observation: ~100 requests of memory
DRIFT = 1.0 / 600              # process noise per second, as a share of the prior variance
NOISE_FLOOR = 0.05             # seconds: predictions below this are treated as this for the noise
NOISE_ALPHA = 0.05


def features(prompt_kb: float, out_k: float, load: float) -> tuple[float, ...]:
    return (1.0, prompt_kb, out_k, load, load * out_k)


def _prior_cov() -> list[list[float]]:
    return [[PRIOR_VAR[i] if i == j else 0.0 for j in range(N)] for i in range(N)]


@attrs.define
class LatencyModel:
    theta: list[float] = attrs.field(factory=lambda: [0.0] * N)
    cov: list[list[float]] = attrs.field(factory=_prior_cov)
    noise: float = 0.25           # relative noise variance: (residual / prediction)^2, a CV^2
    observations: int = 0
    at: float | None = None       # clock of the last drift applied

    def drift(self, now: float) -> None:
        """Let time pass: the parameters may have moved since they were last seen."""
        if self.at is None or now <= self.at:
            self.at = now if self.at is None else self.at
            return
        dt, self.at = now - self.at, now
        for i in range(N):
            self.cov[i][i] += PRIOR_VAR[i] * DRIFT * dt
        self._cap()

    def predict(self, x: Sequence[float]) -> tuple[float, float]:
        """Expected duration at x and the variance of that expectation (not of one request)."""
        cov = self.cov
        mean = 0.0
        var = 0.0
        for i in range(N):
            xi = x[i]
            mean += self.theta[i] * xi
            row = cov[i]
            var += xi * sum(row[j] * x[j] for j in range(N))
        return mean, max(var, 0.0)

    def update(self, x: Sequence[float], y: float, now: float) -> None:
        self.drift(now)
        cov = self.cov
        px = [sum(cov[i][j] * x[j] for j in range(N)) for i in range(N)]
        v = sum(x[i] * px[i] for i in range(N))
        pred = sum(self.theta[i] * x[i] for i in range(N))
        scale = max(pred, y if self.observations == 0 else NOISE_FLOOR, NOISE_FLOOR)
        r = self.noise * scale * scale
        err = y - pred
        if self.observations >= 5:
            limit = 3.0 * math.sqrt(v + r)
            err = max(-limit, min(limit, err))
            self.noise += NOISE_ALPHA * (min((err / scale) ** 2, 25.0) - self.noise)
            self.noise = max(0.0025, min(self.noise, 4.0))
        s = v + r
        if s <= 0.0:
            return
        gain = [p / s for p in px]
        for i in range(N):
            self.theta[i] += gain[i] * err
        inv_lambda = 1.0 / LAMBDA
        for i in range(N):
            gi = gain[i]
            row = cov[i]
            for j in range(N):
                row[j] = (row[j] - gi * px[j]) * inv_lambda
        for i in range(N):             # keep it symmetric against rounding drift
            for j in range(i + 1, N):
                m = 0.5 * (cov[i][j] + cov[j][i])
                cov[i][j] = cov[j][i] = m
            cov[i][i] = max(cov[i][i], 1e-12)
        self._cap()
        self.observations += 1

    def _cap(self) -> None:
        """Scale the covariance down as a whole (it stays positive definite) to within the prior."""
        worst = max(self.cov[i][i] / PRIOR_VAR[i] for i in range(N))
        if worst > 1.0:
            for row in self.cov:
                for j in range(N):
                    row[j] /= worst

    def params(self) -> dict[str, float]:
        t = self.theta
        return {"intercept_s": t[0], "per_prompt_kib_s": t[1], "per_output_token_ms": t[2],
                "per_concurrent_s": t[3], "per_concurrent_output_token_ms": t[4]}


@attrs.define
class Rates:
    """Recent requests, errors and throttles (429s), each decaying with a half-life in seconds.

    The failure probability is a Beta posterior mean with a weak prior (2% over one request), so
    one failure of one request reads as "likely bad" and a recovered deployment's rate falls back
    by itself as time passes, even with no traffic to prove it.
    """

    total: float = 0.0
    errors: float = 0.0
    throttled: float = 0.0
    at: float = 0.0

    PRIOR_RATE = 0.02

    def decay(self, now: float, half_life: float) -> None:
        if now > self.at:
            k = 0.5 ** ((now - self.at) / half_life)
            self.total *= k
            self.errors *= k
            self.throttled *= k
            self.at = now

    def add(self, now: float, half_life: float, *, error: bool = False, throttled: bool = False) -> None:
        self.decay(now, half_life)
        self.total += 1.0
        self.errors += error
        self.throttled += throttled

    def failure_rate(self) -> float:
        return (self.errors + self.throttled + self.PRIOR_RATE) / (self.total + 1.0)

    def error_rate(self) -> float:
        return self.errors / self.total if self.total > 0.01 else 0.0

    def throttle_rate(self) -> float:
        return self.throttled / self.total if self.total > 0.01 else 0.0


@attrs.define
class Ewma:
    value: float | None = None
    alpha: float = 0.1

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@attrs.define
class OutputLength:
    """Output tokens to expect: a share of max_tokens when it is given, a typical count when not."""

    ratio: float = 0.5
    unbounded: float = 256.0
    alpha: float = 0.05

    def expect(self, max_tokens: int) -> float:
        return max_tokens * self.ratio if max_tokens > 0 else self.unbounded

    def observe(self, max_tokens: int, tokens: int) -> None:
        if max_tokens > 0:
            self.ratio += self.alpha * (min(tokens / max_tokens, 1.0) - self.ratio)
        else:
            self.unbounded += self.alpha * (tokens - self.unbounded)
