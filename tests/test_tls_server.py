"""TLS termination: HTTPS to clients with certificates the tests make with the openssl command,
checked at load (--check-config, start, SIGHUP), reloaded on SIGHUP, mixed with plain listeners."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import httpx
import pytest
import trio

from hxgwd.config import load
from hxgwd.config.load import ConfigError
from hxgwd.http.tls_stream import TLSStream
from hxgwd.runtime import build_runtime
from tests.conftest import AUTH, DEV_SHA, gateway_config, start_gateway
from tests.daemon import DaemonProcess
from tests.fakeupstream import FakeUpstream, Reply, Stream

CHAT = {"messages": [{"role": "user", "content": "Return exactly the text: HX-OK"}], "max_tokens": 10}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


def make_cert(d, name: str, *, days: int = 2, dates: tuple[str, str] | None = None) -> tuple[str, str]:
    """A self-signed P-256 certificate for 127.0.0.1 and .2, and its key: valid from now for `days`, or
    between `dates` (openssl's YYYYMMDDHHMMSSZ, in the past or the future: `openssl ca` takes
    those; `req -x509 -days` only counts forward from now)."""
    cert, key = str(d / f"{name}.pem"), str(d / f"{name}.key")
    subj = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2"]
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key]
    if dates is None:
        subprocess.run(["openssl", "req", "-x509", *newkey, "-days", str(days), "-out", cert, *subj],
                       check=True, capture_output=True)
    else:
        ca = d / f"{name}-ca"
        ca.mkdir()
        (ca / "index.txt").write_text("")
        (ca / "serial").write_text("01\n")
        (ca / "ca.cnf").write_text(f"[ca]\ndefault_ca = d\n[d]\ndatabase = {ca}/index.txt\nnew_certs_dir = {ca}\n"
                                   f"serial = {ca}/serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\n"
                                   "[p]\ncommonName = supplied\n")
        subprocess.run(["openssl", "req", "-new", *newkey, "-out", str(ca / "req.csr"), *subj],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "ca", "-batch", "-config", str(ca / "ca.cnf"), "-selfsign", "-keyfile", key,
                        "-in", str(ca / "req.csr"), "-out", cert, "-startdate", dates[0], "-enddate", dates[1],
                        "-notext"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls-server")
    return {name: make_cert(d, name) for name in ("a", "b")} | {"dir": d}


def client_context(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def tls_config(upstream: FakeUpstream, cert: str, key: str, server_extra: str = "") -> str:
    return gateway_config(f"""
        [[backends]]
        name = "up"
        url = "{upstream.url}"
        [[models]]
        name = "m"
        backend = "up"
    """).replace("[server]\n", f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n{server_extra}', 1)


async def handshake(address: str, context: ssl.SSLContext) -> trio.SSLStream:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context, https_compatible=True)
    await stream.do_handshake()
    return stream


def fingerprint(stream: trio.SSLStream) -> str:
    return hashlib.sha256(stream.getpeercert(binary_form=True)).hexdigest()


def der_fingerprint(cert: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(cert).read())).hexdigest()


async def test_https_healthz_and_chat_through_to_the_upstream_with_http11_over_alpn(nursery, upstream, certs):
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(upstream, cert, key))
    address = gw.url.removeprefix("http://")
    assert [line["tls"] for line in gw.log.lines() if line["msg"] == "listening"] == [[address]]
    async with httpx.AsyncClient(base_url=f"https://{address}", verify=client_context(cert), timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200
        for _ in range(3):      # on one keep-alive connection
            r = await client.post("/v1/chat/completions", json={**CHAT, "model": "m"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "HX-OK"
        async with client.stream("POST", "/v1/chat/completions", headers=AUTH,
                                 json={**CHAT, "model": "m", "stream": True}) as r:
            body = b"".join([chunk async for chunk in r.aiter_bytes()])
        assert r.status_code == 200 and body.rstrip().endswith(b"data: [DONE]")

    offers_both = client_context(cert)
    offers_both.set_alpn_protocols(["h2", "http/1.1"])
    stream = await handshake(address, offers_both)
    assert stream.selected_alpn_protocol() == "http/1.1"
    assert stream.version() in ("TLSv1.2", "TLSv1.3")
    await stream.aclose()
    # A client that offers only h2 gets no protocol chosen (OpenSSL carries on without ALPN) and
    # may go on with HTTP/1.1 or give up: either way it is never told h2.
    only_h2 = client_context(cert)
    only_h2.set_alpn_protocols(["h2"])
    stream = await handshake(address, only_h2)
    assert stream.selected_alpn_protocol() is None
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
    await stream.aclose()
    await gw.stop()
    assert len([line for line in gw.log.requests() if line["status"] == 200]) == 4


async def test_large_bodies_both_ways_pipelining_and_close_notify(nursery, upstream, certs):
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(upstream, cert, key))
    address = gw.url.removeprefix("http://")
    big_question, big_answer = "q" * 3_000_000, "a" * 5_000_000    # many SEND_SLICEs and TLS records
    upstream.script(Reply(body={"choices": [{"message": {"role": "assistant", "content": big_answer}}]}),
                    Stream(words=40, pad=50_000))
    async with httpx.AsyncClient(base_url=f"https://{address}", verify=client_context(cert), timeout=30) as client:
        r = await client.post("/v1/chat/completions", headers=AUTH,
                              json={"model": "m", "messages": [{"role": "user", "content": big_question}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == big_answer
        assert upstream.requests[-1].json["messages"][0]["content"] == big_question
        async with client.stream("POST", "/v1/chat/completions", headers=AUTH,
                                 json={**CHAT, "model": "m", "stream": True}) as r:
            body = b"".join([chunk async for chunk in r.aiter_bytes()])
        assert r.status_code == 200 and len(body) > 40 * 50_000 and body.rstrip().endswith(b"data: [DONE]")

    # two requests in one TLS write; then the connection ends with TLS's close_notify, which a
    # client that insists on it (https_compatible=False) reads as a clean end
    host, port = address.rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=client_context(cert))
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 2
    await stream.aclose()
    await gw.stop()


async def test_a_client_not_reading_is_dropped_after_write_timeout_one_reading_slowly_is_not(nursery, certs,
                                                                                              autojump_clock):
    up = FakeUpstream()
    await nursery.start(up.serve)
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(up, cert, key, "write_timeout = 10.0\n"))
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)

    async def request(stream: trio.SSLStream, extra: dict) -> None:
        body = json.dumps({**CHAT, "model": "m", **extra}).encode()
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                              b"sk-hx-dev-1234\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    up.script(Stream(words=2000, pad=16384))     # ~32 MB of events, far more than socket buffers
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=client_context(cert))
    await request(stream, {"stream": True})
    await stream.receive_some(1000)              # then never read again
    began = trio.current_time()
    with trio.fail_after(60):
        while not gw.log.requests():
            await trio.sleep(0.5)
    assert gw.log.requests()[-1]["status"] == 499
    assert 10.0 <= trio.current_time() - began < 20.0
    assert up.chunks_sent < 2000
    await stream.aclose()

    answer = {"pad": "x" * (12 << 20)}           # one write, far more than socket buffers hold
    up.script(Reply(200, body=answer))
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=client_context(cert))
    await request(stream, {})
    received = 0
    with trio.fail_after(1000):                  # 256 KiB a second: ~50 s, never 10 s without progress
        while received < 12 << 20:
            for _ in range(4):                   # 64 KiB: a receive gives one TLS record, 16 KiB at most
                if received >= 12 << 20:         # the answer is in: the connection may now idle out
                    break
                chunk = await stream.receive_some(65536)
                assert chunk, "dropped"
                received += len(chunk)
            await trio.sleep(0.25)
    await stream.aclose()
    await gw.stop()


async def test_tls_stream_as_a_client_too(nursery, upstream, certs):
    # what the upstream pool's own TLS adapter could become: the same stream, client side
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(upstream, cert, key))
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    stream = TLSStream(socket.create_connection((host, int(port))), client_context(cert), server_side=False,
                       server_hostname=host)
    deadline = trio.current_time() + 10
    await stream.do_handshake(deadline)
    assert stream.ssl_object.selected_alpn_protocol() is None      # this client asked for none
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", deadline)
    assert (await stream.receive_some(65536, deadline, wait_first=True)).startswith(b"HTTP/1.1 200 ")
    assert not stream.has_pending()
    with pytest.raises(trio.TooSlowError):                          # nothing more comes
        await stream.receive_some(65536, trio.current_time() + 0.2)
    await stream.aclose()
    untrusted = TLSStream(socket.create_connection((host, int(port))), ssl.create_default_context(),
                          server_side=False, server_hostname=host)
    with pytest.raises(trio.BrokenResourceError, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusted.do_handshake(deadline)
    untrusted.close()
    await gw.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")   # what the test is about
async def test_old_protocols_and_weak_ciphers_are_refused(nursery, upstream, certs):
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(upstream, cert, key))
    address = gw.url.removeprefix("http://")

    def client(minimum: ssl.TLSVersion, maximum: ssl.TLSVersion, ciphers: str = "ALL:@SECLEVEL=0") -> ssl.SSLContext:
        # security level 0, so that it is the server that refuses, not this client's OpenSSL
        ctx = client_context(cert)
        ctx.set_ciphers(ciphers)
        ctx.minimum_version, ctx.maximum_version = minimum, maximum
        return ctx

    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(trio.BrokenResourceError):
            await handshake(address, client(version, version))
    tls12 = await handshake(address, client(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_2))
    assert tls12.version() == "TLSv1.2" and tls12.cipher()[0] in (
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305")
    await tls12.aclose()
    # CBC with SHA-1 is not among Mozilla's intermediate ciphers
    with pytest.raises(trio.BrokenResourceError):
        await handshake(address, client(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA"))
    assert (await httpx.AsyncClient(verify=client_context(cert)).get(f"https://{address}/healthz")).status_code == 200
    await gw.stop()


async def test_a_client_that_never_finishes_the_handshake_is_closed_after_header_timeout(nursery, upstream, certs):
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(upstream, cert, key, "header_timeout = 0.5\n"))
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    for first_bytes in (b"", b"\x16\x03\x01\x02\x00\x01"):   # nothing; the start of a ClientHello
        stream = await trio.open_tcp_stream(host, int(port))
        started = trio.current_time()
        if first_bytes:
            await stream.send_all(first_bytes)
        with trio.fail_after(5):
            while await stream.receive_some(65536):
                pass
        assert 0.4 < trio.current_time() - started < 2
        await stream.aclose()
    assert gw.daemon.holder.current is not None
    r = await httpx.AsyncClient(verify=client_context(cert)).get(f"https://{host}:{port}/healthz")
    assert r.status_code == 200
    await gw.stop()


async def test_plain_and_tls_listeners_side_by_side(nursery, upstream, certs):
    cert, key = certs["a"]
    gw = await start_gateway(nursery, tls_config(upstream, cert, key).replace(
        'listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:0", "127.0.0.2:0"]\ntls_listen = ["127.0.0.2:0"]'))
    (listening,) = [line for line in gw.log.lines() if line["msg"] == "listening"]
    plain, tls = listening["addresses"]
    assert listening["tls"] == [tls] and plain.startswith("127.0.0.1:") and tls.startswith("127.0.0.2:")
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
        r = await client.post(f"http://{plain}/v1/chat/completions", json={**CHAT, "model": "m"})
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):        # plain HTTP to the TLS listener: closed
            await client.get(f"http://{tls}/healthz")
    async with httpx.AsyncClient(headers=AUTH, timeout=30, verify=client_context(cert)) as client:
        r = await client.post(f"https://{tls}/v1/chat/completions", json={**CHAT, "model": "m"})
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):        # TLS to the plain one: answered 400, not served
            await client.get(f"https://{plain}/healthz")
    await gw.stop()


async def test_sighup_serves_new_connections_the_new_certificate_and_keeps_it_on_a_bad_one(nursery, tmp_path, certs):
    up = FakeUpstream()
    await nursery.start(up.serve)
    (cert_a, key_a), (cert_b, key_b) = certs["a"], certs["b"]
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(cert_a, live_cert)
    shutil.copy(key_a, live_key)
    path = tmp_path / "hxgwd.toml"
    path.write_text(tls_config(up, str(live_cert), str(live_key)))
    daemon = DaemonProcess(str(path))
    try:
        await daemon.start(nursery)
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        kept = await handshake(daemon.address, insecure)
        assert fingerprint(kept) == der_fingerprint(cert_a)

        shutil.copy(cert_b, live_cert)     # a renewal: the same paths, new files
        shutil.copy(key_b, live_key)
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("config reloaded", after=mark)
        fresh = await handshake(daemon.address, insecure)
        assert fingerprint(fresh) == der_fingerprint(cert_b)
        await fresh.aclose()
        # the connection from before the reload goes on with its own
        await kept.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await kept.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        await kept.aclose()

        shutil.copy(key_a, live_key)       # half a renewal: the key no longer matches the certificate
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        rejected = await daemon.wait_for("reload rejected, still serving the previous config", after=mark)
        assert rejected["problems"] == [f"server.tls_key: {live_key} is not the key of the certificate in {live_cert}"]
        fresh = await handshake(daemon.address, insecure)
        assert fingerprint(fresh) == der_fingerprint(cert_b)
        await fresh.aclose()
    finally:
        daemon.kill()


def problems_of(tmp_path, server_lines: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\n{server_lines}\n[[keys]]\nname = "dev"\nsha256 = "{DEV_SHA}"\n'
                    '[[backends]]\nname = "echo"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "echo"\n')
    with pytest.raises(ConfigError) as exc:
        build_runtime(str(path), 1)
    return exc.value.problems


def test_certificate_problems_are_errors_with_their_key_path(tmp_path, certs):
    (cert_a, key_a), (cert_b, key_b) = certs["a"], certs["b"]
    missing = tmp_path / "missing.pem"
    assert problems_of(tmp_path, f'tls_cert = "{missing}"\ntls_key = "{key_a}"') == [
        f"server.tls_cert: cannot read {missing}: No such file or directory"]
    assert problems_of(tmp_path, f'tls_cert = "{cert_a}"\ntls_key = "{tmp_path}"') == [
        f"server.tls_key: cannot read {tmp_path}: Is a directory"]
    assert problems_of(tmp_path, f'tls_cert = "{cert_a}"\ntls_key = "{key_b}"') == [
        f"server.tls_key: {key_b} is not the key of the certificate in {cert_a}"]
    assert problems_of(tmp_path, f'tls_cert = "{key_a}"\ntls_key = "{key_a}"') == [
        f"server.tls_cert: no PEM certificate in {key_a}"]
    expired = make_cert(tmp_path, "expired", dates=("20200101000000Z", "20200102000000Z"))
    assert problems_of(tmp_path, f'tls_cert = "{expired[0]}"\ntls_key = "{expired[1]}"') == [
        f"server.tls_cert: {expired[0]} expired on 2020-01-02 00:00:00 UTC"]
    future = make_cert(tmp_path, "future", dates=("20990101000000Z", "20990102000000Z"))
    assert problems_of(tmp_path, f'tls_cert = "{future[0]}"\ntls_key = "{future[1]}"') == [
        f"server.tls_cert: {future[0]} is not valid before 2099-01-01 00:00:00 UTC"]
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", key_a, "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                   check=True, capture_output=True)
    assert problems_of(tmp_path, f'tls_cert = "{cert_a}"\ntls_key = "{encrypted}"') == [
        f"server.tls_key: {encrypted} is encrypted with a passphrase; hxgwd needs it unencrypted "
        "(protect it with file permissions instead)"]
    assert problems_of(tmp_path, f'tls_cert = "{cert_a}"') == ["server: set both tls_cert and tls_key, or neither"]
    assert problems_of(tmp_path, 'listen = ["127.0.0.1:4010"]\ntls_listen = ["127.0.0.1:4010", ":4010"]') == [
        "server.tls_listen: TLS needs tls_cert and tls_key",
        "server.tls_listen[1]: ':4010' is not an entry of server.listen"]


def test_check_config_reports_certificate_errors_and_warns_of_expiry_and_a_readable_key(tmp_path, certs):
    cert_a, key_a = certs["a"]
    soon = make_cert(tmp_path, "soon", days=5)
    os.chmod(soon[1], 0o644)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\ntls_cert = "{soon[0]}"\ntls_key = "{soon[1]}"\n'
                   '[[backends]]\nname = "echo"\nkind = "echo"\n[[models]]\nname = "m"\nbackend = "echo"\n')
    os.chmod(cfg, 0o600)

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hxgwd", "--check-config", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    out = check()
    assert out.returncode == 0, out.stderr
    assert f"  warning: TLS private key file {soon[1]} is readable by other users (chmod o-r)" in out.stderr
    assert f"  warning: TLS certificate {soon[0]} (server.tls_cert) expires in 4 day(s), on " in out.stderr
    assert f"tls:      every listen address; {soon[0]} until " in out.stdout
    cfg.write_text(cfg.read_text().replace(soon[1], key_a))
    out = check()
    assert out.returncode == 1
    assert f"  error: server.tls_key: {key_a} is not the key of the certificate in {soon[0]}" in out.stderr


def test_the_example_documents_tls_and_loads_with_it(certs):
    cert, key = certs["a"]
    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "hxgwd.toml.example")).read()
    text = text.replace('# tls_cert = "/etc/hxgwd/tls/fullchain.pem"', f'tls_cert = "{cert}"')
    text = text.replace('# tls_key = "/etc/hxgwd/tls/privkey.pem"', f'tls_key = "{key}"')
    config = load.loads(text)
    assert config.server.tls_cert == cert and config.server.tls_listen == ()
