"""What a request may cost, reserved when it is admitted, and what a finished one did cost.

Admission reserves the estimate and settlement corrects it to the real usage, so limits hold for
concurrent requests as long as the estimate is an upper bound of the real cost: it leans high
(a token per BYTES_PER_TOKEN bytes of body, max_tokens for each choice, the dearest deployment).
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs

from hxgwd.config.model import Model
from hxgwd.runtime import Deployment

DEFAULT_MAX_TOKENS = {"chat": 256, "embedding": 0}  # completion tokens assumed when max_tokens is absent
BYTES_PER_TOKEN = 4                               # prompt tokens ~= request body bytes / 4
MAX_TOKENS_ESTIMATED = 1 << 24     # more output than any model's context window holds today
MAX_CHOICES = 128                  # n and best_of counted up to this (OpenAI's own cap on n)
MAX_GENERATIONS = 1 << 16          # choices x prompts counted up to this: sums stay in int64 (Redis)


@attrs.frozen
class Estimate:
    tokens: int        # prompt + completion tokens, an upper bound in practice
    cost_usd: float    # worst case over the deployments that may serve the request


def estimate(kind: str, prompt_bytes: int, max_tokens: int | None, deployments: Iterable[Deployment],
             choices: int = 1, prompt_tokens: int = 0) -> Estimate:
    """`kind` "chat" or "embedding"; `max_tokens` 0 or None when the request gives none, per
    choice; `choices` completions generated (n, best_of, prompts); `prompt_tokens` a floor for the
    prompt that the bytes may not show (token arrays, items)."""
    prompt = max(-(-prompt_bytes // BYTES_PER_TOKEN), prompt_tokens)
    output = 0 if kind == "embedding" else (max_tokens or DEFAULT_MAX_TOKENS.get(kind, 0)) * choices
    cost = max((usage_cost(d.config, prompt, output) for d in deployments), default=0.0)
    return Estimate(prompt + output, cost)


def estimate_request(kind: str, payload: dict[str, Any], prompt_bytes: int,
                     deployments: Iterable[Deployment]) -> Estimate:
    """The admission estimate of a parsed request body: what it may cost at most, as far as the
    body tells. An upstream bills every choice it generates (`n`, `best_of`, each prompt of a
    completions list), and an embeddings or completions prompt given as token arrays holds more
    tokens than its bytes / 4. Without max_tokens, DEFAULT_MAX_TOKENS per choice is a guess, not a
    bound: such a request may settle above its reservation, past the budget by that much."""
    # embeddings: `input`, or `prompt` as single-prompt (Ollama) backends spell it; completions: `prompt`
    given = payload.get("input", payload.get("prompt")) if kind == "embedding" else payload.get("prompt")
    items, item_tokens = _prompt_items(given)
    choices = max(_choices(payload.get("n")), _choices(payload.get("best_of")))
    return estimate(kind, prompt_bytes, max_tokens(payload), deployments,
                    choices=min(choices * max(items, 1), MAX_GENERATIONS), prompt_tokens=item_tokens)


def max_tokens(payload: dict[str, Any]) -> int:
    """Output tokens asked for per choice, 0 when not said: bounded, so that one request's absurd
    value cannot overflow a cost or skew what others are routed on."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):   # the last: Responses
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_TOKENS_ESTIMATED)
    return 0


def _choices(value: Any) -> int:
    """n or best_of as the client gave it: an int in [1, MAX_CHOICES]; anything else counts as 1
    (the upstream rejects it, or takes its default of 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        return min(value, MAX_CHOICES)
    return 1


def _prompt_items(given: Any) -> tuple[int, int]:
    """-> (prompts, tokens at least) of an `input` / `prompt`: a string, a token array, or a list
    of either. Each item is at least one token, a token array exactly its length."""
    if isinstance(given, str):
        return 1, 1
    if not isinstance(given, list) or not given:
        return 0, 0
    if all(isinstance(t, int) for t in given):                 # one token array
        return 1, len(given)
    return len(given), sum(len(i) if isinstance(i, list) else 1 for i in given)


def usage_cost(model: Model, prompt_tokens: int, completion_tokens: int) -> float:
    """USD for a usage at a deployment's prices (what settle() wants for a finished request)."""
    return (prompt_tokens * model.input_cost_per_1k + completion_tokens * model.output_cost_per_1k) / 1000
