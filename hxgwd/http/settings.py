"""What a server connection needs to know of its settings: limits and per-phase timeouts.

hxgwd/http/ knows nothing of the gateway's config: the caller builds these (the gateway once per
config generation, from `[server]`), and `HttpConnection` asks for them again at each request, so
that a reload applies to the next request of a kept-alive connection.
"""

from __future__ import annotations

import attrs


@attrs.frozen(slots=True)
class ConnectionSettings:
    max_header_bytes: int = 16384        # request line + headers; more -> 431
    max_body_bytes: int = 16 << 20       # request body; more -> 413
    header_timeout: float = 10.0         # from the first byte of a request to its last header -> 408
    body_timeout: float = 30.0           # between two pieces of a request body -> 408
    body_total_timeout: float = 120.0    # from the first wait for a request body to its end -> 408
    keepalive_timeout: float = 75.0      # idle keep-alive connection -> closed silently
    write_timeout: float = 60.0          # a client that takes none of a write this long -> dropped
