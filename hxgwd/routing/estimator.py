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


# Symmetric 3 x 3 matrices are kept as their upper triangle: (m00, m01, m02, m11, m12, m22).
Sym = list[float]
PRIOR_INFO = (1.0 / PRIOR_VAR[0], 0.0, 0.0, 1.0 / PRIOR_VAR[1], 0.0, 1.0 / PRIOR_VAR[2])


def _inverse(m: Sym) -> Sym:
    """Inverse of a symmetric positive definite 3 x 3 matrix, by cofactors."""
    a, b, c, e, f, i = m
    A, B, C = e * i - f * f, c * f - b * i, b * f - c * e
    det = a * A + b * B + c * C
    if det <= 0.0:
        raise ZeroDivisionError("singular information matrix")
    d = 1.0 / det
    return [A * d, B * d, C * d, (a * i - c * c) * d, (b * c - a * f) * d, (a * e - b * b) * d]


def quad(m: Sym, x0: float, x1: float, x2: float) -> float:
    a, b, c, e, f, i = m
    return a * x0 * x0 + e * x1 * x1 + i * x2 * x2 + 2.0 * (b * x0 * x1 + c * x0 * x2 + f * x1 * x2)


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
    info: Sym = attrs.field(factory=lambda: list(PRIOR_INFO))
    noise: float = 0.25           # relative noise variance: (residual / prediction)^2, a CV^2
    observations: int = 0
    at: float | None = None       # clock of the last drift applied
    kappa: float = 0.0            # slowdown share per concurrent request
    load_sums: list[float] = attrs.field(factory=lambda: [0.0] * 5)   # n, c, r, c^2, c*r; forgetting
    _cov: Sym | None = attrs.field(default=None, init=False, repr=False, eq=False)

    @property
    def cov(self) -> Sym:
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
        t0, t1, t2 = self.theta
        norm = t0 * t0 + t1 * t1 + t2 * t2
        if norm <= 0.0:
            return
        cov = self.cov
        q = min(DRIFT * dt, max(0.0, 1.0 - quad(cov, t0, t1, t2) / (norm * norm)))
        if q <= 0.0:
            return
        a, b, c, e, f, i = cov
        self._cov = cov = [a + q * t0 * t0, b + q * t0 * t1, c + q * t0 * t2,
                           e + q * t1 * t1, f + q * t1 * t2, i + q * t2 * t2]
        self.info = _inverse(cov)

    def base(self, kb: float, out_k: float) -> float:
        t = self.theta
        return t[0] + t[1] * kb + t[2] * out_k

    def predict(self, kb: float, out_k: float, load: float) -> tuple[float, float]:
        """Expected duration and the variance of that expectation (not of one request's time)."""
        t = self.theta
        base = t[0] + t[1] * kb + t[2] * out_k
        var = quad(self.cov, 1.0, kb, out_k)
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
        self._fit(kb, out_k, y / (1.0 + self.kappa * load))
        self.observations += 1

    def _fit(self, x1: float, x2: float, y: float) -> None:
        # Forget toward the prior, then a Kalman step with that as the prior: same mean, and the
        # information of this observation added. x0 = 1 (the intercept).
        lam, rest = LAMBDA, 1.0 - LAMBDA
        a, b, c, e, f, i = self.info
        info = [lam * a + rest * PRIOR_INFO[0], lam * b, lam * c,
                lam * e + rest * PRIOR_INFO[3], lam * f, lam * i + rest * PRIOR_INFO[5]]
        pa, pb, pc, pe, pf, pi = _inverse(info)
        px0 = pa + pb * x1 + pc * x2
        px1 = pb + pe * x1 + pf * x2
        px2 = pc + pf * x1 + pi * x2
        v = px0 + px1 * x1 + px2 * x2
        t = self.theta
        pred = t[0] + t[1] * x1 + t[2] * x2
        scale = max(pred, y if self.observations == 0 else NOISE_FLOOR, NOISE_FLOOR)
        r = self.noise * scale * scale
        err = y - pred
        if self.observations >= 5:
            limit = 3.0 * math.sqrt(v + r)
            err = max(-limit, min(limit, err))
            # bounded steps: one outlier moves the noise level by at most a few percent
            self.noise += NOISE_ALPHA * (min((err / scale) ** 2, 4.0 * self.noise) - self.noise)
            self.noise = max(0.0025, min(self.noise, 4.0))
        k = 1.0 / (v + r)
        step = err * k
        t[0] += px0 * step
        t[1] += px1 * step
        t[2] += px2 * step
        w = 1.0 / r
        self.info = [info[0] + w, info[1] + w * x1, info[2] + w * x2,
                     info[3] + w * x1 * x1, info[4] + w * x1 * x2, info[5] + w * x2 * x2]
        # the matching covariance, by Sherman-Morrison rather than another inverse
        self._cov = [pa - px0 * px0 * k, pb - px0 * px1 * k, pc - px0 * px2 * k,
                     pe - px1 * px1 * k, pf - px1 * px2 * k, pi - px2 * px2 * k]

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
        if not math.isfinite(x):    # one bad sample would stay in the average for good
            return
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
