"""The markers both sides of the HTTP layer hand out beside heads and body pieces: one NEED_DATA
for the server and the client protocol, so code (and tests) that drive either compare against
the same object."""

from __future__ import annotations


class Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = Marker("NEED_DATA")          # feed more bytes (server, between requests: answer this one first)
END_OF_BODY = Marker("END_OF_BODY")      # server: the request body is complete
PEER_CLOSED = Marker("PEER_CLOSED")      # server: the client closed its side between requests
END_OF_MESSAGE = Marker("END_OF_MESSAGE")   # client: the answer is complete
