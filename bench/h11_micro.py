#!/usr/bin/env python3
"""Micro-benchmark of the h11 backends against 8b1739f's direct use of h11 (issue 15), sans I/O:

    PYTHONPATH=. .venv/bin/python bench/h11_micro.py [so sn sl co cn cl]

so/sn/sl: server side, old (8b1739f's pipeline/parse.py ServerConn) / h11 backend / llhttp backend:
feed one chat POST, read head, body and end, write a Content-Length answer, next cycle.
co/cn/cl: client side, old (8b1739f's pool: h11 writes the request) / h11 backend / llhttp backend:
build a POST, parse a Content-Length answer from an nginx-like upstream, start the next exchange.
Best of 5 runs of 20,000 loops, µs per loop. The old module is taken from git (git show 8b1739f:...).
"""
import os, subprocess, tempfile
_OLD = tempfile.mkdtemp(prefix="h11micro-")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path, _name in (("hxgwd/pipeline/parse.py", "old_parse.py"), ("hxgwd/errors.py", "old_errors.py")):
    _text = subprocess.run(["git", "-C", _REPO, "show", f"8b1739f:{_path}"], capture_output=True, text=True, check=True).stdout
    open(os.path.join(_OLD, _name), "w").write(_text.replace("from hxgwd.errors import", "from old_errors import"))
import sys, time, json
sys.path.insert(0, _OLD)
import h11
from old_parse import ServerConn, splice_headers
from hxgwd.http.client import END_OF_MESSAGE, NEED_DATA
from hxgwd.http.parsers import client_protocol, server_protocol

body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 20}]}).encode()
REQ = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:4395\r\nUser-Agent: bench/1\r\n"
       b"Accept: */*\r\nAuthorization: Bearer sk-test-abcdefghijklmnop\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n" % len(body)) + body
ANS_HEADERS = [(b"content-type", b"application/json"), (b"x-request-id", b"abc123"), (b"date", b"Sun, 06 Dec 2026 02:00:00 GMT")]
ANS = b'{"id":"x","choices":[{"message":{"content":"hi"}}]}' * 3

def server_new(p):
    p.feed(REQ)
    h = p.next(); b = p.next(); e = p.next()
    p.response_full(200, ANS_HEADERS, ANS)
    p.start_next_cycle()
    assert p.next() is not None

def server_old(p):
    p.feed(REQ)
    h = p.next(); b = p.next(); e = p.next()
    p.response_full(200, ANS_HEADERS, ANS)
    p.start_next_cycle()
    p.next()

RESP = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: Sun, 06 Dec 2026 02:00:00 GMT\r\n"
        b"server: uvicorn\r\ncontent-length: %d\r\n\r\n" % len(ANS)) + ANS
UP_HEADERS = [(b"host", b"127.0.0.1:18395"), (b"authorization", b"Bearer sk-up"), (b"content-type", b"application/json"), (b"accept", b"*/*")]

def client_new(c):
    c.request(b"POST", b"/v1/chat/completions", UP_HEADERS, body)
    c.feed(RESP)
    h = c.next(); d = c.next(); e = c.next()
    assert e is END_OF_MESSAGE, e
    c.start_next()

END = h11.EndOfMessage()
def client_old(c):
    framing = [(b"host", b"127.0.0.1:18395"), (b"content-length", str(len(body)).encode())]
    head = c.send(h11.Request(method=b"POST", target=b"/v1/chat/completions", headers=framing))
    data = b"".join((splice_headers(head, UP_HEADERS[1:]), c.send(h11.Data(data=body)), c.send(END)))
    c.receive_data(RESP)
    ev = c.next_event(); hd = list(ev.headers)
    d = c.next_event(); e = c.next_event()
    assert type(e) is h11.EndOfMessage
    assert not c.trailing_data[0]
    c.start_next_cycle()

def bench(name, fn, obj, n=20000):
    for _ in range(500): fn(obj)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n): fn(obj)
        best = min(best, (time.perf_counter() - t) / n)
    print(f"{name:12s} {best*1e6:7.2f} us")

which = sys.argv[1:] or ["so", "sn", "co", "cn"]
if "so" in which: bench("server old", server_old, ServerConn(65536))
if "sn" in which: bench("server new", server_new, server_protocol("h11", 65536))
if "sl" in which: bench("server llhttp", server_new, server_protocol("httptools", 65536))
if "co" in which: bench("client old", client_old, h11.Connection(h11.CLIENT, max_incomplete_event_size=65536))
if "cn" in which: bench("client new", client_new, client_protocol("h11", 65536))
if "cl" in which: bench("client llhttp", client_new, client_protocol("httptools", 65536))
