"""Differential fuzzing of the HTTP parsers, sans-I/O (issue 15, point 3).

The same seeded random and mutated byte streams go to every parser backend, on both sides of the
gateway, and each must come to the same outcome: the same requests (method, target, lowercased
headers, body) or responses (status, headers, body), in order, then the same ending (refused,
waiting for more, or closed). Two parsers that frame one stream differently are how smuggling
happens; one that frames a stream differently depending on how it was cut into reads is the same
bug within one parser.

The streams start from valid messages and from the smuggling corpus (tests/test_smuggling.py) and
are mutated: bit flips, inserted CR, LF, NUL, SP, HTAB, ",", ":" or digits, deleted bytes,
duplicated lines, changed numbers. Each is fed whole and in random pieces.

`hxgwd.http.server_protocol` and `hxgwd.http.client_protocol` put two backends (llhttp, h11)
behind one interface each: every stream must give the same outcome from both (the same messages,
or both refuse), and the same from one backend however the stream is cut into reads.
"""

from __future__ import annotations

import importlib
import random
import re
import time
from typing import Any, Callable

import pytest

from hxgwd.errors import GatewayError
from tests.test_smuggling import ANSWERS, CASES, FIRST, chunked, chunked_answer
from tests.smuggling import answer_bytes

SERVER_CASES = 3000
CLIENT_CASES = 3000
MAX_HEAD = 16384            # far above the streams made here: the head limit is tested on its own
SEED = 15_3
MAX_EVENTS = 10_000         # per read: a parser that never asks for more data fails, not hangs

# --- inputs -------------------------------------------------------------------------------------

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
VALID_REQUESTS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY),
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY),
    b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, end=b"0\r\nX-T: 1\r\n\r\n"),
    b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, ext=b";a=b"),
    b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\n\r\n",
    b"GET /v1/models?x=1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /v1/x HTTP/1.0\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc",
    b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
]
SERVER_SEEDS = ([a + b for a in VALID_REQUESTS for b in VALID_REQUESTS[:3]] + VALID_REQUESTS
                + [case.data for case in CASES if len(case.data) < 8192])

VALID_RESPONSES = [
    answer_bytes(FIRST),
    chunked_answer(FIRST),
    chunked_answer(FIRST, end=b"0\r\nX-T: 1\r\n\r\n"),
    b"HTTP/1.1 100 Continue\r\n\r\n" + answer_bytes(FIRST),
    b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + FIRST,     # delimited by the close
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\n{}",
]
CLIENT_SEEDS = VALID_RESPONSES + [a.script.data + a.script.later for a in ANSWERS if len(a.script.data) < 8192]

INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b",", b":", b"0", b"1", b"9", b"f", b"-", b"+", b";",
           b"\x7f", b"\x80", b'"']


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` with 1 to 3 mutations, each the kind a smuggler or a broken peer makes."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at:at] = rng.choice(INSERTS)
        elif kind == 2 and out:
            del out[at:at + rng.randrange(1, 4)]
        elif kind == 3:
            lines = bytes(out).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            out = bytearray(b"\r\n".join(lines))
        elif kind == 4:
            numbers = list(re.finditer(rb"[0-9a-fA-F]+", bytes(out)))
            if numbers:
                m = rng.choice(numbers)
                out[m.start():m.end()] = rng.choice([b"0", b"1", b"%d" % rng.randrange(1 << 16), b"1" + b"0" * 17,
                                                     b"%x" % rng.randrange(1 << 16), b"00" + m.group()])
        else:
            lines = bytes(out).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines[i] = lines[i].swapcase() if rng.randrange(2) else lines[i].replace(b": ", b":", 1)
            out = bytearray(b"\r\n".join(lines))
    return bytes(out)


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut at random points: the reads a socket could hand over."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 8)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def streams(seeds: list[bytes], n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    """Each seed as it is, then mutants of random seeds, `n` in all."""
    return [seeds[i] if i < len(seeds) else mutate(rng.choice(seeds), rng) for i in range(n)]


# --- the server side ------------------------------------------------------------------------------

Outcome = tuple[tuple[Any, ...], str]


def server_outcome(make: Callable[[], Any], names: dict[str, Any], parts: list[bytes]) -> Outcome:
    """Feed `parts`, then the end of the stream, answering each request as a server would; the
    requests delivered, each (method, target, headers, body), and how it ended: "refused",
    "closed" (the peer's end, or a request after which the connection ends) or "waiting"."""
    conn = make()
    requests: list[tuple[Any, ...]] = []
    head, body = None, b""
    refusals = names["refusals"]
    try:
        for part in [*parts, b""]:
            conn.feed(part)
            for _ in range(MAX_EVENTS):
                event = conn.next()
                if event is names["NEED_DATA"]:
                    break
                if event is names["PEER_CLOSED"]:
                    return tuple(requests), "closed"
                if type(event) is bytes:
                    body += event
                elif event is names["END_OF_BODY"]:
                    requests.append((head.method, head.target, tuple((n.lower(), v) for n, v in head.headers), body))
                    conn.response_full(200, [], b"")
                    if not (head.keep_alive and conn.reusable):
                        return tuple(requests), "closed"
                    conn.start_next_cycle()
                    head, body = None, b""
                else:
                    head = event
            else:
                raise AssertionError(f"{MAX_EVENTS} events from one read, never NEED_DATA")
    except refusals:
        return tuple(requests), "refused"
    return tuple(requests), "waiting"


def http_names(module_names: list[str], wanted: list[str]) -> dict[str, Any]:
    """`wanted` names from the first of `module_names` that has each; skips naming what is missing."""
    found: dict[str, Any] = {}
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in wanted:
            if attr not in found and hasattr(module, attr):
                found[attr] = getattr(module, attr)
    missing = [w for w in wanted if w not in found]
    if missing:
        pytest.skip(f"not written yet: {', '.join(missing)} in {' or '.join(module_names)}")
    return found


def new_server(parser: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    names = http_names(["hxgwd.http", "hxgwd.http.server"],
                       ["server_protocol", "ProtocolError", "NEED_DATA", "PEER_CLOSED", "END_OF_BODY"])
    from hxgwd.http import resolve_parser
    if resolve_parser("auto") != "httptools" and parser == "httptools":
        pytest.skip("httptools is not installed")
    names["refusals"] = (names["ProtocolError"], GatewayError)
    make = lambda: names["server_protocol"](parser, MAX_HEAD)     # noqa: E731
    lacking = [a for a in ("feed", "next", "response_full", "reusable", "start_next_cycle") if not hasattr(make(), a)]
    if lacking:
        pytest.skip(f"server_protocol({parser!r}) has no {', '.join(lacking)} (as parse.ServerConn has): adapt server_outcome")
    return make, names


def test_server_backends_frame_every_stream_alike():
    backends = {parser: new_server(parser) for parser in ("h11", "httptools")}
    rng = random.Random(SEED)
    started = time.monotonic()
    differ = []
    for data in streams(SERVER_SEEDS, SERVER_CASES, SEED):
        split = pieces(data, rng)
        outcomes = {p: server_outcome(make, names, split) for p, (make, names) in backends.items()}
        if outcomes["h11"] != outcomes["httptools"]:
            differ.append((data, outcomes))
    elapsed = time.monotonic() - started
    print(f"{SERVER_CASES} server streams, both backends, in {elapsed:.1f} s; {len(differ)} differ")
    assert not differ, describe(differ)


@pytest.mark.parametrize("backend", ["h11", "httptools"])
def test_server_side_frames_a_stream_alike_however_it_is_cut(backend):
    make, names = new_server(backend)
    rng = random.Random(SEED + 1)
    started = time.monotonic()
    differ, delivered = [], 0
    for data in streams(SERVER_SEEDS, SERVER_CASES, SEED + 1):
        whole = server_outcome(make, names, [data])
        cut = server_outcome(make, names, pieces(data, rng))
        bytewise = server_outcome(make, names, [data[i:i + 1] for i in range(len(data))]) if len(data) < 300 else cut
        if not whole == cut == bytewise:
            differ.append((data, {"whole": whole, "cut": cut, "bytewise": bytewise}))
        for method, target, headers, body in whole[0]:
            check_delivered(method, target, headers, body)
            delivered += 1
    elapsed = time.monotonic() - started
    print(f"{backend}: {SERVER_CASES} streams in {elapsed:.1f} s, {delivered} requests delivered, {len(differ)} differ")
    assert not differ, describe(differ)


TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def check_delivered(method: str, target: str, headers: tuple, body: bytes) -> None:
    """What any request handed to the gateway must be, whatever bytes it came from."""
    assert TOKEN.match(method), method
    # origin form, "*", or what no route matches; never a scheme and host the gateway would ignore
    assert not re.match(r"https?://", target, re.I), target
    assert not re.search(r"[\x00-\x20\x7f]", target), target
    lengths = [v for n, v in headers if n == b"content-length"]
    for name, value in headers:
        assert re.fullmatch(rb"[!#$%&'*+.^_`|~0-9a-z-]+", name), name
        # the gateway refuses control characters in values: none may reach an upstream
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value), (name, value)
        assert value == value.strip(b" \t"), (name, value)
    if lengths and not any(n == b"transfer-encoding" for n, _ in headers):
        assert len(body) == int(lengths[0].split(b",")[0]), (lengths, len(body))


def describe(differ: list) -> str:
    lines = [f"{len(differ)} streams framed differently; the first ones:"]
    for data, outcomes in differ[:5]:
        lines.append(f"  {data[:300]!r}")
        lines += [f"    {name}: {outcome!r}"[:600] for name, outcome in outcomes.items()]
    return "\n".join(lines)


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_head_size_limit_holds_however_the_head_arrives(parser):
    # Found by the split-invariance fuzz near the limit, in the h11-only parse.py: a head it measured
    # whole (target, names and values) and one still arriving (every byte) were not counted alike,
    # so a head of 1030 to 1044 bytes with a limit of 1024 passed whole and was 431 in two reads.
    from hxgwd.http import NEED_DATA, ProtocolError, server_protocol
    for pad in range(960, 1060, 7):
        data = b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"

        def answers(parts: list[bytes]) -> str:
            conn = server_protocol(parser, 1024)
            try:
                for part in parts:
                    conn.feed(part)
                    while (event := conn.next()) is not NEED_DATA:
                        return type(event).__name__
            except ProtocolError as exc:
                return str(exc.status)
            return "waiting"

        assert answers([data]) == answers([data[:-1], data[-1:]]) == answers([data[:30], data[30:]]), pad


# --- the client side ------------------------------------------------------------------------------

def client_outcome(make: Callable[[], Any], names: dict[str, Any], parts: list[bytes]) -> Outcome:
    """One request sent, then `parts` and the end of the stream fed as its answer: the responses
    (status, headers, body; 1xx included, without a body) and how it ended: "refused",
    "complete" (the final answer's end) or "waiting"."""
    conn = make()
    names["send_request"](conn)
    responses: list[tuple[Any, ...]] = []
    head, body = None, b""
    try:
        for part in [*parts, b""]:
            conn.feed(part)
            for _ in range(MAX_EVENTS):
                event = conn.next()
                if event is names["NEED_DATA"]:
                    break
                if type(event) is bytes:
                    body += event
                elif event is names["END_OF_MESSAGE"]:
                    responses.append((head.status, tuple((n.lower(), v) for n, v in head.headers), body))
                    return tuple(responses), "complete"
                elif getattr(event, "status", 200) < 200:
                    responses.append((event.status, tuple((n.lower(), v) for n, v in event.headers), b""))
                else:
                    head = event
            else:
                raise AssertionError(f"{MAX_EVENTS} events from one read, never NEED_DATA")
    except names["refusals"]:
        return tuple(responses), "refused"
    return tuple(responses), "waiting"


def new_client(parser: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    names = http_names(["hxgwd.http", "hxgwd.http.client"],
                       ["client_protocol", "ResponseError", "NEED_DATA", "END_OF_MESSAGE"])
    if resolve_available() != "httptools" and parser == "httptools":
        pytest.skip("httptools is not installed")
    names["refusals"] = (names["ResponseError"], GatewayError)
    make = lambda: names["client_protocol"](parser, 65536)     # noqa: E731
    probe = make()
    for call in (lambda c: c.request(b"POST", b"/v1/chat/completions", [(b"host", b"u")], BODY),
                 lambda c: c.request(method=b"POST", target=b"/v1/chat/completions",
                                     headers=[(b"host", b"u")], body=BODY)):
        try:
            call(probe)
        except TypeError:
            continue
        names["send_request"] = call
        return make, names
    pytest.skip("client_protocol(...).request(method, target, headers, body): another signature; adapt new_client")


def resolve_available() -> str:
    from hxgwd.http import resolve_parser
    return resolve_parser("auto")


def test_client_backends_frame_every_answer_alike():
    backends = {parser: new_client(parser) for parser in ("h11", "httptools")}
    rng = random.Random(SEED + 2)
    started = time.monotonic()
    differ = []
    for data in streams(CLIENT_SEEDS, CLIENT_CASES, SEED + 2):
        split = pieces(data, rng)
        outcomes = {p: client_outcome(make, names, split) for p, (make, names) in backends.items()}
        if outcomes["h11"] != outcomes["httptools"]:
            differ.append((data, outcomes))
    elapsed = time.monotonic() - started
    print(f"{CLIENT_CASES} answers, both backends, in {elapsed:.1f} s; {len(differ)} differ")
    assert not differ, describe(differ)


@pytest.mark.parametrize("backend", ["h11", "httptools"])
def test_client_side_frames_an_answer_alike_however_it_is_cut(backend):
    make, names = new_client(backend)
    rng = random.Random(SEED + 3)
    started = time.monotonic()
    differ, endings = [], {}
    for data in streams(CLIENT_SEEDS, CLIENT_CASES, SEED + 3):
        whole = client_outcome(make, names, [data])
        cut = client_outcome(make, names, pieces(data, rng))
        if whole != cut:
            differ.append((data, {"whole": whole, "cut": cut}))
        endings[whole[1]] = endings.get(whole[1], 0) + 1
    print(f"{backend}: {CLIENT_CASES} answers in {time.monotonic() - started:.1f} s, {endings}, {len(differ)} differ")
    assert not differ, describe(differ)


def test_mutations_are_deterministic_and_varied():
    a, b = streams(SERVER_SEEDS, 500, SEED), streams(SERVER_SEEDS, 500, SEED)
    assert a == b
    assert len(set(a)) > 450
