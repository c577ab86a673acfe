"""TLS termination: HTTPS to clients with certificates the tests make with the openssl command,
checked at load (--check-config, start, SIGHUP), reloaded on SIGHUP, mixed with plain listeners."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hxgwd.config import load
from hxgwd.config.load import ConfigError
from hxgwd.runtime import build_runtime
from tests.conftest import DEV_SHA

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
