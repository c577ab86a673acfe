"""CORS: which web pages may call the API from a browser, from `[server] cors_origins`. Sans I/O:
the config and a request head in, an answer or headers out.

- Only API paths (`is_api`: all of /v1/..., and the table's model endpoints without /v1): health
  checks need no browser, and an admin key has no business in a web page. The whole /v1 prefix,
  not the endpoints that exist, so that a preflight, which comes without a key, tells nobody
  which paths exist.
- A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here, before
  authentication: browsers send it without the app's headers, its key included. An allowed origin
  gets a 204 that allows the method and headers asked for, reflected: what the gateway does not
  serve, it answers itself (405, 404) where the app can read it, and the OpenAI SDKs send
  headers of their own (x-stainless-*, openai-organization, openai-project, ...) that a fixed list
  would fall behind. Any other origin, and any origin while cors_origins is empty, gets a 403
  with no CORS header: the browser fails the call either way (Fetch: a preflight needs an ok
  status and the origin allowed), and the 403's message in the developer tools says why.
- Every answer to an allowed origin (errors, 401 and 429 included, and streams) carries
  Access-Control-Allow-Origin and exposes the headers an app reads (EXPOSED); with a list of
  origins, every answer says `Vary: Origin`, so that no cache hands one origin's answer to another.
- Credentials (cookies, HTTP authentication) only with `cors_allow_credentials`, which validation
  refuses with "*": the gateway's own keys are headers an app sets, not credentials.
"""

from __future__ import annotations

from hxgwd.config.model import Server
from hxgwd.errors import Forbidden, capped
from hxgwd.http import Headers
from hxgwd.http.protocol import RequestHead

API_PREFIX = "/v1/"
# What an app may read of an answer beyond the CORS-safelisted headers: the request ids, the
# gateway's own headers, and what the OpenAI SDKs read to retry and to report limits (passed
# through from the backend).
EXPOSED = (b"x-request-id, x-hx-request-id, x-hx-deployment, x-hx-route, x-hx-overhead-ms, retry-after, "
           b"retry-after-ms, x-should-retry, x-ratelimit-limit-requests, x-ratelimit-limit-tokens, "
           b"x-ratelimit-remaining-requests, x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, "
           b"x-ratelimit-reset-tokens, openai-processing-ms, openai-version")
ANY_ORIGIN: Headers = [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", EXPOSED)]
VARY_ORIGIN = (b"vary", b"origin")
PREFLIGHT_VARY = (b"vary", b"origin, access-control-request-method, access-control-request-headers")
JSON = (b"content-type", b"application/json")


def is_api(path: str, model_endpoint: bool) -> bool:
    """`model_endpoint`: the endpoint table serves a model at `path` (an alias without /v1 too)."""
    return model_endpoint or path.startswith(API_PREFIX)


def preflight(server: Server, head: RequestHead, api: bool | None = None) -> tuple[int, Headers, bytes] | None:
    """The answer to `head` if it is a CORS preflight on an API path: (status, headers, body).
    `api`: whether it is one (`is_api`); None: decided by the /v1/ prefix alone."""
    if head.method != "OPTIONS" or not (head.path.startswith(API_PREFIX) if api is None else api):
        return None
    origin = head.header(b"origin")
    method = head.header(b"access-control-request-method")
    if origin is None or method is None:
        return None         # a plain OPTIONS request: the API answers it (401, 405)
    allowed = _allowed(server, origin)
    if allowed is None:
        refusal = Forbidden(f"The origin '{capped(origin.decode('latin-1'))}' may not call this API from a "
                            "browser: it is not in the gateway's server.cors_origins.",
                            code="cors_origin_not_allowed")
        return refusal.status, [JSON, PREFLIGHT_VARY], refusal.body()
    # reflected as they came: the HTTP parsers refused controls (CR, LF) in header values already
    headers = [(b"access-control-allow-origin", allowed), (b"access-control-allow-methods", method),
               (b"access-control-max-age", b"%d" % server.cors_max_age), PREFLIGHT_VARY]
    if (asked := head.header(b"access-control-request-headers")) is not None:
        headers.append((b"access-control-allow-headers", asked))
    if server.cors_allow_credentials:
        headers.append((b"access-control-allow-credentials", b"true"))
    return 204, headers, b""


def answer_headers(server: Server, head: RequestHead, api: bool | None = None) -> Headers:
    """The CORS headers of any answer to `head` (none when CORS is off or off the API)."""
    if not server.cors_origins or not (head.path.startswith(API_PREFIX) if api is None else api):
        return []
    if server.cors_origins == ("*",):
        return ANY_ORIGIN        # the same for every origin and for none: no Vary
    origin = head.header(b"origin")
    if origin is None or (allowed := _allowed(server, origin)) is None:
        return [VARY_ORIGIN]
    headers = [(b"access-control-allow-origin", allowed), (b"access-control-expose-headers", EXPOSED),
               VARY_ORIGIN]
    if server.cors_allow_credentials:
        headers.append((b"access-control-allow-credentials", b"true"))
    return headers


def _allowed(server: Server, origin: bytes) -> bytes | None:
    """What Access-Control-Allow-Origin says to `origin`: "*", the origin itself, or None. Origins
    are compared as browsers serialise them; validation wrote the config's that way."""
    origins = server.cors_origins
    if origins == ("*",):
        return b"*"
    return origin if origin.decode("latin-1") in origins else None
