"""Large requests against the echo backend, in a daemon process of its own: the event loop keeps
answering others meanwhile, and the memory they took goes back to the system afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx
import pytest
import trio

from hxgwd.offload import dumps_in_steps
from hxgwd.pipeline.body import json_document, json_document_in_steps
from hxgwd.upstream.echo import _word_count
from tests.conftest import AUTH, gateway_config
from tests.daemon import DaemonProcess

# A second client, in a process of its own so that the test's own work (building and reading
# 40 MB bodies) cannot delay it: /healthz on one keep-alive connection every 5 ms until stdin
# closes, then the latencies, in ms.
PROBE = textwrap.dedent("""
    import json, select, socket, sys, time
    host, port = sys.argv[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    ask = b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
    times = []
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while not select.select([sys.stdin], [], [], 0.005)[0]:
        began = time.perf_counter()
        s.sendall(ask)
        got = b""
        while not got.endswith(b"}"):
            got += s.recv(65536)
        times.append((time.perf_counter() - began) * 1000)
    print(json.dumps(times))
""")


async def post(address: str, path: str, body: bytes) -> int:
    """The answer's status, its body read and dropped: a plain socket, so that the test's own
    reading of 40 MB answers takes as little of the shared CPUs as it can."""
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (path.encode(), AUTH["Authorization"].encode(), len(body)))
        await stream.send_all(body)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        while await stream.receive_some(1 << 20):
            pass
    return int(head.split(b" ", 2)[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_large_requests_neither_stall_the_loop_nor_keep_their_memory(nursery, tmp_path):
    config = tmp_path / "hxgwd.toml"
    config.write_text(gateway_config("""
        [[backends]]
        name = "echo"
        kind = "echo"
        echo_dimensions = 1024
        [[models]]
        name = "chat"
        backend = "echo"
        [[models]]
        name = "emb"
        backend = "echo"
        kind = "embedding"
    """, extra="[log]\naccess_log = false\n"))
    daemon = DaemonProcess(str(config))
    await daemon.start(nursery)
    pid = daemon.proc.pid
    # ~15 MB of many messages; 2,048 short inputs; 8 MB of 2,048 long inputs
    chat = json.dumps({"model": "chat", "max_tokens": 5, "messages": [
        {"role": "user", "content": f"message {i} " + "lorem ipsum dolor sit amet " * 20} for i in range(27000)]}).encode()
    short = json.dumps({"model": "emb", "input": [f"input {i}" for i in range(2048)]}).encode()
    long = json.dumps({"model": "emb", "input": [f"{i} " + "x" * 4000 for i in range(2048)]}).encode()
    assert 14e6 < len(chat) < 16e6 and 8e6 < len(long) < 9e6
    headers = {**AUTH, "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as client:
        for body in (b'{"model":"chat","messages":[{"role":"user","content":"hi"}]}',
                     b'{"model":"emb","input":["hi"]}'):
            assert (await client.post("/v1/chat/completions" if b"messages" in body else "/v1/embeddings",
                                      content=body, headers=headers)).status_code == 200
        await trio.sleep(1.5)
        baseline = rss_mib(pid)
        probe = await trio.lowlevel.open_process([sys.executable, "-c", PROBE, daemon.address],
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert (await probe.stdout.receive_some(100)).strip() == b"ready"
        peak = baseline

        async def watch_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_mib(pid))
                await trio.sleep(0.02)

        async with trio.open_nursery() as watching:
            watching.start_soon(watch_rss)
            for path, body in (("/v1/chat/completions", chat), ("/v1/embeddings", short),
                               ("/v1/embeddings", long)):
                assert await post(daemon.address, path, body) == 200
            watching.cancel_scope.cancel()
        await probe.stdin.aclose()
        out = b""
        while chunk := await probe.stdout.receive_some(65536):
            out += chunk
        await probe.wait()
        latencies = json.loads(out)
        right_after = after = rss_mib(pid)
        done = trio.current_time()
        with trio.move_on_after(10):
            while (after := rss_mib(pid)) > baseline + 20:
                await trio.sleep(0.1)
        waited = trio.current_time() - done
    daemon.kill()
    print(f"healthz: {len(latencies)} probes, p50 {sorted(latencies)[len(latencies) // 2]:.1f} ms, "
          f"p99 {p99(latencies):.1f} ms, max {max(latencies):.1f} ms; "
          f"RSS MiB: baseline {baseline:.0f}, peak {peak:.0f}, at the end {right_after:.0f}, "
          f"{after:.0f} {waited:.1f} s later")
    assert p99(latencies) < 50
    assert after <= baseline + 20


@pytest.mark.parametrize("text", [
    '{"model":"m","input":["a","b"]}', ' { "a" : [ 1 , 2.5 , {"b":[]} ] , "c" : "d" , "a" : [] } ', '{}', '{ }',
    '{"a":[]}', '{"a":[ ]}', '[1,2]', '"x"', '{"a":1}\n', '{"a":[1,]}', '{"a":[1 2]}', '{"a":1,}', '{"a" 1}',
    '{"a":1} x', '{"a":NaN}', '{"a":[Infinity]}', '{"a":1e400}', '{"a":[1e400]}', '\ufeff{"a":1}', '{"a":[',
    '{"a":"\\ud800"}', '{a:1}', '{"a":[1]]', '{"a":[1]', '', ' ', '{"\\u00e9":["\\n"]}', '{"a":[[[]]]}',
    '{"a":' + '[' * 5000 + ']' * 5000 + '}', '{"a":[' + '[' * 5000 + ']' * 5000 + ']}',
])
def test_parsing_in_steps_gives_what_parsing_at_once_gives(text):
    def outcome(parse):
        try:
            return "ok", parse(text.encode())
        except ValueError:
            return "error", None
    assert outcome(json_document_in_steps) == outcome(json_document)


def test_echo_counts_words_in_pieces_as_split_does():
    texts = ["", " ", "a", " a ", "ab cd", "abc  def\tghi\n", "x" * 10, " x" * 7 + " ", "αβ γ\u2003δ"]
    for text in texts:
        for piece in (1, 2, 3, 5, 65536):
            assert _word_count(text, piece) == len(text.split()), (text, piece)


@pytest.mark.parametrize("doc", [
    {}, {"a": []}, {"model": "m", "messages": [{"role": "user", "content": "é \" \n"}], "n": 1.5, "x": None},
    {"a": [[1, 2], [], {"b": [3]}]}, ["top", "list"], "text", {"1": [True, False, None]},
])
def test_encoding_in_steps_gives_what_encoding_at_once_gives(doc):
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    assert dumps_in_steps(doc, encode) == encode(doc).encode()


async def test_a_20_mb_upload_is_held_once(nursery, tmp_path):
    """Transcription forms are read as they arrive and sent on in pieces: the daemon's RSS grows
    by less than twice the file while it is in flight."""
    from tests.fakeupstream import FakeUpstream

    up = FakeUpstream()
    await nursery.start(up.serve)
    config = tmp_path / "hxgwd.toml"
    config.write_text(gateway_config(f"""
        [[backends]]
        name = "u"
        url = "{up.url}"
        [[models]]
        name = "stt"
        backend = "u"
        kind = "transcription"
    """, extra="[log]\naccess_log = false\n"))    # the default max_upload_bytes (32 MiB) takes it
    daemon = DaemonProcess(str(config))
    await daemon.start(nursery)
    try:
        await _upload_20_mb(daemon, up)
    finally:
        daemon.kill()


async def _upload_20_mb(daemon: DaemonProcess, up) -> None:
    pid = daemon.proc.pid
    audio = bytes(range(256)) * (20 * 4096)            # 20 MiB
    boundary = b"hxgwd-test-boundary"
    form = (b"--%b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nstt\r\n"
            b"--%b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" % (boundary, boundary))
    tail = b"\r\n--%b--\r\n" % boundary
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as client:
        await client.get("/healthz")
        await trio.sleep(1)
        baseline = peak = rss_mib(pid)

        async def body():
            yield form
            for at in range(0, len(audio), 1 << 20):
                yield audio[at:at + (1 << 20)]
                await trio.sleep(0.02)
            yield tail

        async def watch_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_mib(pid))
                await trio.sleep(0.005)

        async with trio.open_nursery() as watching:
            watching.start_soon(watch_rss)
            r = await client.post("/v1/audio/transcriptions", content=body(), headers={
                **AUTH, "content-type": "multipart/form-data; boundary=" + boundary.decode(),
                "content-length": str(len(form) + len(audio) + len(tail))})
            await trio.sleep(0.2)
            watching.cancel_scope.cancel()
    assert r.status_code == 200 and up.requests[-1].form["file"].data == audio
    growth = peak - baseline
    print(f"RSS MiB: baseline {baseline:.0f}, peak {peak:.0f}, growth {growth:.0f} for a 20 MiB upload")
    assert growth < 2 * 20, growth
