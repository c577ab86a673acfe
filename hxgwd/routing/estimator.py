"""What the scored strategy learns from finished requests, with no tokenizer on the request path.

Latency model
-------------
A request's time to finish on one deployment is modelled as

    duration ~ (th0 + th1*kb + th2*out) * (1 + kappa*c)
                base: on an idle server        load

kb: the prompt's size in KiB (bytes stand in for tokens); out: output tokens, in thousands; c: the
other requests on the deployment meanwhile (at most its concurrency cap: requests waiting at the
gateway do not load the upstream). th0 is the fixed part (network, the provider's own queue) and
the time to the first token of an empty prompt, th1 the prefill cost per KiB, th2 seconds per
1000 output tokens, kappa the share by which each concurrent request slows the others down
(continuous batching shares the GPU: prefill and decoding alike). A provider whose capacity is
not ours to fill learns kappa ~ 0.

The two factors are fitted in turns, each a well-conditioned problem of its own: the base by
recursive least squares on duration / (1 + kappa*c), kappa by a forgetting least-squares slope of
duration / base - 1 against c (with an intercept, so a base that is off by some percent does not
leak into kappa). A single multiplicative load share is learned far more steadily
from noisy latencies than separate additive slopes per feature, and it is what makes the cost a
request imposes on the others (`strategies`) computable: c * kappa * base.

The same model, fitted separately on streams' time to the response head (out = 0), is the learned
time to first byte; it is shown, not used to route. At plan time the output length is unknown:
`OutputLength` predicts it from max_tokens, and as the model is linear in `out`, plugging in that
expectation gives the expected duration.

The base fit is recursive least squares in its Kalman form (see `LatencyModel`):
- forgetting per observation (LAMBDA) tracks drift under steady traffic; it relaxes toward the
  prior, so directions no request varies do not wind up;
- silence makes an unobserved deployment's predictions uncertain again, in proportion, which is
  what draws exploration back to a deployment after an outage or a quiet spell;
- observation noise is relative (variance ~ prediction^2): latencies are closer to log-normal
  than to constant-variance, so a 60 s request's 6 s error weighs like a 0.6 s request's 60 ms;
- innovations are clipped at 3 sigma once a few requests are in, so one stuck request does not
  wreck the fit.
"""

from __future__ import annotations

import math

import attrs

N = 3
# Prior variances of th (seconds^2 in the units above). The prior mean is 0; `strategies` replaces
# an unmeasured deployment's mean by its peers', so "unknown" reads as "like the others, unsure".
PRIOR_VAR = (4.0, 0.25, 400.0)
LAMBDA = 0.99                  # forgetting per observation: ~100 requests of memory
DRIFT = 0.0015                 # relative variance per second of silence: +-30% after a minute
DRIFT_STEP = 0.05              # seconds: drift is applied in steps at least this long
NOISE_FLOOR = 0.05             # seconds: predictions below this are treated as this for the noise
NOISE_ALPHA = 0.05
LOAD_LAMBDA = 0.995            # kappa's memory: ~200 requests; it moves slower than the base
LOAD_PRIOR = 25.0              # kappa's pull toward 0, in units of c^2 (a few loaded requests' worth)
LOAD_MAX = 1.0


def _prior_info() -> list[list[float]]:
    return [[1.0 / PRIOR_VAR[i] if i == j else 0.0 for j in range(N)] for i in range(N)]


def _inverse(m: list[list[float]]) -> list[list[float]]:
    """3 x 3 symmetric positive definite inverse, by cofactors."""
    (a, b, c), (_, e, f), (_, _, i) = m
    A, B, C = e * i - f * f, c * f - b * i, b * f - c * e
    det = a * A + b * B + c * C
    if det <= 0.0:
        raise ZeroDivisionError("singular information matrix")
    d = 1.0 / det
    E, F, I = a * i - c * c, b * c - a * f, a * e - b * b
    return [[A * d, B * d, C * d], [B * d, E * d, F * d], [C * d, F * d, I * d]]


@attrs.define
class LatencyModel:
    """The base model th (with its information matrix) and the load share kappa.

    The base is kept in information form, which makes forgetting well-behaved: each observation
    first lets a share (1 - LAMBDA) of what was known relax back to the prior, then adds its own
    information. Plain exponential forgetting instead inflates the directions no request varies
    (every request of an embedding group has out = 0) until the prior cap, and with them the
    uncertainty of every prediction. Silence adds uncertainty along th itself (the whole
    deployment may have become slower or faster, e.g. another tenant on the GPU), which keeps the
    shape of what was learned and widens every prediction by the same share.
    """

    theta: list[float] = attrs.field(factory=lambda: [0.0] * N)
    info: list[list[float]] = attrs.field(factory=_prior_info)
    noise: float = 0.25           # relative noise variance: (residual / prediction)^2, a CV^2
    observations: int = 0
    at: float | None = None       # clock of the last drift applied
    kappa: float = 0.0            # slowdown share per concurrent request
    load_sums: list[float] = attrs.field(factory=lambda: [0.0] * 5)   # n, c, r, c^2, c*r; forgetting
    _cov: list[list[float]] | None = attrs.field(default=None, init=False, repr=False, eq=False)

    @property
    def cov(self) -> list[list[float]]:
        if self._cov is None:
            self._cov = _inverse(self.info)
        return self._cov

    def drift(self, now: float) -> None:
        """Let time pass: the deployment may have become faster or slower since last seen.

        Applied in steps of at least DRIFT_STEP seconds (the variance added is linear in time, so
        the sum is the same), at most up to a relative variance of 1.
        """
        if self.at is None:
            self.at = now
            return
        dt = now - self.at
        if dt < DRIFT_STEP:
            return
        self.at = now
        t = self.theta
        norm = t[0] * t[0] + t[1] * t[1] + t[2] * t[2]
        if norm <= 0.0:
            return
        cov = self.cov
        along = sum(t[i] * cov[i][j] * t[j] for i in range(N) for j in range(N)) / (norm * norm)
        q = min(DRIFT * dt, max(0.0, 1.0 - along))
        if q <= 0.0:
            return
        self.info = _inverse([[cov[i][j] + q * t[i] * t[j] for j in range(N)] for i in range(N)])
        self._cov = None

    def base(self, kb: float, out_k: float) -> float:
        t = self.theta
        return t[0] + t[1] * kb + t[2] * out_k

    def predict(self, kb: float, out_k: float, load: float) -> tuple[float, float]:
        """Expected duration and the variance of that expectation (not of one request's time)."""
        t, c = self.theta, self.cov
        base = t[0] + t[1] * kb + t[2] * out_k
        var = (c[0][0] + c[1][1] * kb * kb + c[2][2] * out_k * out_k
               + 2.0 * (c[0][1] * kb + c[0][2] * out_k + c[1][2] * kb * out_k))
        factor = 1.0 + self.kappa * load
        return base * factor, (var if var > 0.0 else 0.0) * factor * factor

    def update(self, kb: float, out_k: float, load: float, y: float, now: float) -> None:
        self.drift(now)
        if self.observations >= 5 and load > 0.0:
            base = self.base(kb, out_k)
            if base > NOISE_FLOOR:
                r = max(-0.9, min(y / base - 1.0, 10.0))
                s = self.load_sums
                for i, v in enumerate((1.0, load, r, load * load, load * r)):
                    s[i] = LOAD_LAMBDA * s[i] + v
                n, sc, sr, scc, scr = s
                var_c = scc - sc * sc / n
                cov_cr = scr - sc * sr / n
                self.kappa = max(0.0, min(cov_cr / (var_c + LOAD_PRIOR), LOAD_MAX))
        self._fit((1.0, kb, out_k), y / (1.0 + self.kappa * load))
        self.observations += 1

    def _fit(self, x: tuple[float, float, float], y: float) -> None:
        # Forget toward the prior, then a Kalman step with that as the prior: same mean, and the
        # information of this observation added.
        info = self.info
        for i in range(N):
            row = info[i]
            for j in range(N):
                row[j] *= LAMBDA
            row[i] += (1.0 - LAMBDA) / PRIOR_VAR[i]
        self._cov = None
        cov, t = self.cov, self.theta
        x0, x1, x2 = x
        px = [row[0] * x0 + row[1] * x1 + row[2] * x2 for row in cov]
        v = px[0] * x0 + px[1] * x1 + px[2] * x2
        pred = t[0] * x0 + t[1] * x1 + t[2] * x2
        scale = max(pred, y if self.observations == 0 else NOISE_FLOOR, NOISE_FLOOR)
        r = self.noise * scale * scale
        err = y - pred
        if self.observations >= 5:
            limit = 3.0 * math.sqrt(v + r)
            err = max(-limit, min(limit, err))
            # bounded steps: one outlier moves the noise level by at most a few percent
            self.noise += NOISE_ALPHA * (min((err / scale) ** 2, 4.0 * self.noise) - self.noise)
            self.noise = max(0.0025, min(self.noise, 4.0))
        step = err / (v + r)
        for i in range(N):
            t[i] += px[i] * step
        inv_r = 1.0 / r
        for i in range(N):
            row, xi = info[i], x[i] * inv_r
            for j in range(N):
                row[j] += xi * x[j]
        self._cov = None

    def params(self) -> dict[str, float]:
        t = self.theta
        return {"intercept_s": t[0], "per_prompt_kib_s": t[1], "per_output_token_ms": t[2],
                "slowdown_per_concurrent": self.kappa}


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

    def add(self, now: float, half_life: float, *, error: bool = False, throttled: bool = False,
            age: float = 0.0) -> None:
        """One request's verdict. `age`: how long ago it was sent, which is when its evidence is
        from: a hang reported by its 120 s timeout tells of the deployment two minutes ago."""
        self.decay(now, half_life)
        w = 0.5 ** (age / half_life) if age > 0.0 else 1.0
        self.total += w
        self.errors += w * error
        self.throttled += w * throttled

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
