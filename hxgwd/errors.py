"""Errors a client can see, drawn once; each class carries its HTTP status and OpenAI error type.

    GatewayError                          status  type
    ├── BadRequest                        400     invalid_request_error
    │   ├── Unauthorized                  401     authentication_error
    │   ├── Forbidden                     403     permission_error
    │   ├── NotFound                      404     invalid_request_error   (model_not_found, ...)
    │   ├── MethodNotAllowed              405     invalid_request_error
    │   ├── RequestTimeout                408     invalid_request_error
    │   ├── PayloadTooLarge               413     invalid_request_error
    │   ├── UnsupportedEncoding           415     invalid_request_error   (+ Accept-Encoding)
    │   ├── HeadersTooLarge               431     invalid_request_error
    │   ├── VersionNotSupported           505     invalid_request_error
    │   └── RateLimited                   429     rate_limit_error        (+ Retry-After)
    └── UpstreamError                     502     upstream_error
        ├── UpstreamTimeout               504     upstream_error
        └── Unavailable                   503     service_unavailable     (+ Retry-After)
            └── ShuttingDown              503     service_unavailable     (cut off by a shutdown)

Messages are fixed texts chosen by the code that raises; exception text from libraries never
reaches a client, and a client's own string repeated in one (a model name, a path) is `capped`.
`fault` says whose fault an error is (caller, policy, upstream, gateway): it goes to logs and
usage records, so operators can tell our own 429 from a provider's.
"""

from __future__ import annotations

import json
import math

from hxgwd.http import HttpError

MAX_ECHOED = 256    # characters of a client's string repeated in an error message or a log line


def capped(text: str) -> str:
    """`text`, or its first MAX_ECHOED characters and a marker saying it was cut, from what length:
    a 1 MB model name must not make a 1 MB error body or access-log line. Real names are far
    shorter (config names: 128 at most), so nothing anyone needs to read is ever cut."""
    if len(text) <= MAX_ECHOED:
        return text
    return f"{text[:MAX_ECHOED]}…(cut, {len(text)} chars)"


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    fault = "gateway"
    # why, for the operator only (the access line's `cause`): "connect refused (ECONNREFUSED)";
    # never in the answer, whose message is a fixed text
    cause: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after
        if cause is not None:
            self.cause = cause

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error shape; every key present, as SDKs expect."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    fault = "caller"


class Unauthorized(BadRequest):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b"Bearer"), *super().headers()]     # RFC 9110, 11.6.1


class Forbidden(BadRequest):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"
    fault = "policy"


class NotFound(BadRequest):
    status = 404
    code = "not_found"


class MethodNotAllowed(BadRequest):
    status = 405
    code = "method_not_allowed"

    def __init__(self, allow: tuple[str, ...]) -> None:
        super().__init__(f"Use {allow[0]} for this endpoint.")
        self.allow = allow

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allow).encode()), *super().headers()]


def require_method(method: str, *allowed: str) -> None:
    """405, with the Allow header, unless `method` is one of `allowed`. HEAD goes wherever GET
    does: the HTTP layer answers it as GET without the body (RFC 9110, 9.3.2)."""
    if "GET" in allowed:
        allowed += ("HEAD",)
    if method not in allowed:
        raise MethodNotAllowed(allowed)


class RequestTimeout(BadRequest):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "request_too_large"


class UnsupportedEncoding(BadRequest):
    """A request body in a content coding the gateway does not decode."""

    status = 415
    code = "unsupported_content_encoding"

    def __init__(self, message: str, accepted: tuple[str, ...]) -> None:
        super().__init__(message)
        self.accepted = accepted

    def headers(self) -> list[tuple[bytes, bytes]]:
        # the codings that would have been taken (RFC 9110, 15.5.16)
        return [(b"accept-encoding", ", ".join(self.accepted).encode()), *super().headers()]


class HeadersTooLarge(BadRequest):
    status = 431
    code = "headers_too_large"


class VersionNotSupported(BadRequest):
    status = 505
    code = "http_version_not_supported"


class RateLimited(BadRequest):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    fault = "policy"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"
    fault = "upstream"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class Unavailable(UpstreamError):
    status = 503
    type = "service_unavailable"
    code = "no_deployment_available"


class ShuttingDown(Unavailable):
    code = "shutdown"
    fault = "gateway"


STATUS_ERRORS: dict[int, type[GatewayError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, RequestTimeout,
                PayloadTooLarge, HeadersTooLarge, RateLimited, UpstreamError, UpstreamTimeout,
                Unavailable)
}


class HttpErrors:
    """How the HTTP layer's refusals (hxgwd.http.HttpError: a status and a reason) reach a client
    of the gateway: as the GatewayError of that status, OpenAI-shaped like every other error. The
    HTTP layer is given one of these (http/connection.py, Errors) and knows no format itself."""

    BY_STATUS: dict[int, type[GatewayError]] = {408: RequestTimeout, 413: PayloadTooLarge, 431: HeadersTooLarge,
                                                505: VersionNotSupported}

    def refusal(self, error: HttpError) -> GatewayError:
        if error.status == 400:
            return BadRequest(error.message, code="bad_http")
        cls = self.BY_STATUS.get(error.status)
        return GatewayError(error.message) if cls is None else cls(error.message)

    def answer(self, exc: Exception) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        if not isinstance(exc, GatewayError):
            return None
        return exc.status, [(b"content-type", b"application/json"), *exc.headers()], exc.body()
