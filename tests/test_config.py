"""Config: strict loading with key paths, the example file, dumps, and the CLI around it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.parse

import attrs
import pytest

from hxgwd.config import dump, load
from hxgwd.config import model as m
from hxgwd.runtime import compile_config
from tests.conftest import ROOT

EXAMPLE = os.path.join(ROOT, "hxgwd.toml.example")

MINIMAL = """
[[backends]]
name = "echo"
kind = "echo"
[[models]]
name = "m"
backend = "echo"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(load.ConfigError) as exc:
        load.loads(text)
    return exc.value.problems


def test_example_is_valid_and_documents_every_key():
    config = load.load_file(EXAMPLE)
    compile_config(config, 1)
    text = open(EXAMPLE).read()
    for cls in (m.Server, m.Timeouts, m.Routing, m.Log, m.Database, m.Redis, m.Limits, m.Key, m.Backend,
                m.Model, m.Group):
        for field in attrs.fields(cls):
            if field.name == "name" and cls is m.Group:
                continue
            assert re.search(rf"^#?\s*{field.name}\s*=", text, re.M), f"{cls.__name__}.{field.name} undocumented"


def test_every_error_named_by_key_path():
    got = problems("""
        [servre]
        [[backends]]
        name = "a"
        url = "http://x"
        [[backends]]
        name = "b"
        url = "ftp://x"
        timeouts = { connect = -1 }
        [[models]]
        name = "m"
        backend = "zz"
        weight = "heavy"
        [groups.g]
        models = ["nope"]
        strategy = "random"
    """)
    assert "servre: unknown key (did you mean 'server'?)" in got
    assert "backends[1].url: scheme must be http or https" in got
    assert "backends[1].timeouts.connect: must be greater than 0" in got
    assert "models[0].backend: no backend named 'zz'" in got
    assert "models[0].weight: expected a number" in got
    assert "groups.g.models[0]: no model named 'nope'" in got
    assert any(p.startswith("groups.g.strategy: must be one of") for p in got)


@pytest.mark.parametrize("snippet, expected", [
    ('[server]\nlisten = ["nope"]', "server.listen[0]: 'nope': expected HOST:PORT"),
    ('[[keys]]\nname = "k"\nsha256 = "xyz"', "keys[0].sha256: must be 64 lowercase hex digits (sha256 of the key)"),
    ('[[keys]]\nname = "k"', "keys[0]: set exactly one of sha256, key_env, key_file"),
    ('[[backends]]\nname = "echo"\nkind = "echo"', "backends[1].name: duplicate backend name 'echo'"),
    ('[groups.m]\nmodels = ["m"]', "groups.m: a model has the same name; a target must name one or the other"),
    ('[limits]\ntimezone = "Mars/Base"', "limits.timezone: unknown time zone 'Mars/Base'"),
    ('[database]\nurl = "mysql://x"', "database.url: use sqlite:////absolute/path.db, sqlite:///relative.db or postgresql://user@host/db"),
    ('[database]\nretention_days = -1', "database.retention_days: must be 0 (keep all) or more"),
    # what once passed the check and then broke the daemon, a reload or every request
    ('[server]\nkeepalive_timeout = nan', "server.keepalive_timeout: must be a finite number"),
    ('[timeouts]\ntotal = inf', "timeouts.total: must be a finite number"),
    ('[[keys]]\nname = "k"\nsha256 = "' + "ab" * 32 + '"\nbudget_usd = nan', "keys[0].budget_usd: must be a finite number"),
    ('[[backends]]\nname = "b"\nurl = "http://[zz]:80"', "backends[1].url: not a valid URL"),
    ('[[backends]]\nname = "b"\nurl = "http://127.0.0.1:4811/v1 "', "backends[1].url: must not contain spaces"),
    ('[[backends]]\nname = "b"\nurl = "http://127.0.0.1:0"', "backends[1].url: port must be a number from 1 to 65535"),
    ('[server]\nbacklog = 99999999999999', "server.backlog: must be at most 65535"),
    ('[server]\nlisten = ["127.0.0.1:4810", "0.0.0.0:4810"]', "server.listen[1]: '0.0.0.0:4810' overlaps an address listed before it"),
    ('[server]\nlisten = ["127.0.0.1:4810", "127.0.0.1:4810"]', "server.listen[1]: '127.0.0.1:4810' overlaps"),
])
def test_single_errors(snippet, expected):
    assert any(p.startswith(expected) for p in problems(MINIMAL + snippet))


def test_errors_name_entries_by_their_place_in_the_file_even_after_a_broken_one():
    got = problems(MINIMAL + '[[keys]]\nsha256 = "' + "ab" * 32 + '"\n[[keys]]\nname = "second"\nsha256 = "BAD"\n'
                   '[[backends]]\nurl = "http://h"\n[[backends]]\nname = "b2"\nurl = "ftp://h"\n')
    assert "keys[0].name: required" in got and "keys[1].sha256: must be 64 lowercase hex digits (sha256 of the key)" in got
    assert "backends[1].name: required" in got and "backends[2].url: scheme must be http or https" in got


def test_a_backends_timeouts_override_only_what_they_name():
    config = load.loads(MINIMAL + '[timeouts]\nconnect = 1.0\ntotal = 30.0\n'
                        '[[backends]]\nname = "b"\nurl = "http://h"\ntimeouts = { first_byte = 60.0 }\n')
    assert (config.backends[1].timeouts.connect, config.backends[1].timeouts.total,
            config.backends[1].timeouts.first_byte) == (1.0, 30.0, 60.0)


def test_files_that_are_not_utf8_are_refused(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(MINIMAL.encode() + '[[models]]\nname = "m2"\nbackend = "echo"\nupstream_model = "café"\n'.encode("latin-1"))
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    for path, why in ((latin1, "not UTF-8"), (bom, "byte order mark")):
        with pytest.raises(load.ConfigError) as exc:
            load.load_file(str(path))
        assert why in exc.value.problems[0]


def test_backend_url_with_and_without_v1_and_secrets(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text("sk-from-file\n")
    config = load.loads(f"""
        [[keys]]
        name = "f"
        key_file = "{key_file}"
        [[keys]]
        name = "e"
        key_env = "CLIENT_KEY"
        [[backends]]
        name = "a"
        url = "http://h:4000"
        api_key_env = "A"
        [[backends]]
        name = "b"
        url = "https://h/v1/"
    """)
    rt = compile_config(config, 1, environ={"A": "sk-a", "CLIENT_KEY": "sk-env"})
    assert rt.backends["a"].path("/chat/completions") == "/v1/chat/completions"
    assert rt.backends["b"].path("/embeddings") == "/v1/embeddings"
    assert rt.backends["b"].origin.port == 443 and rt.backends["a"].api_key == "sk-a"
    assert hashlib.sha256(b"sk-from-file").digest() in rt.keys
    assert hashlib.sha256(b"sk-env").digest() in rt.keys
    with pytest.raises(load.ConfigError) as exc:
        compile_config(config, 1, environ={})
    assert "backends[0].api_key_env: environment variable A is not set" in exc.value.problems
    assert "keys[1].key_env: environment variable CLIENT_KEY is not set" in exc.value.problems
    with pytest.raises(load.ConfigError) as exc:       # blank: a key nobody could ever send
        compile_config(config, 1, environ={"A": "sk-a", "CLIENT_KEY": "   "})
    assert exc.value.problems == ["keys[1].key_env: environment variable CLIENT_KEY is empty"]
    key_file.write_bytes(b"sk-\xff\xfe")
    with pytest.raises(load.ConfigError) as exc:
        compile_config(config, 1, environ={"A": "sk-a", "CLIENT_KEY": "sk-env"})
    assert exc.value.problems == [f"keys[0].key_file: {key_file} is not UTF-8 text"]


ENDPOINTS = ["/chat/completions", "/completions", "/embeddings", "/responses", "/moderations", "/rerank",
             "/audio/transcriptions", "/audio/translations", "/audio/speech", "/images/generations"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("base, use", [("http://host:8000/v1", "http://host:8000/v1"),
                                       ("http://host:8000", "http://host:8000/v1"),
                                       ("https://gw.example/openai/v1/", "https://gw.example/openai/v1")])
@pytest.mark.parametrize("slash", ["", "/"])
def test_a_backend_url_ending_in_an_endpoint_is_refused_with_the_base_to_use(base, use, endpoint, slash):
    url = base.rstrip("/") + endpoint + slash
    got = problems(MINIMAL + f'[[backends]]\nname = "b"\nurl = "{url}"\n')
    doubled = urllib.parse.urlsplit(url).path.rstrip("/") + "/v1" + endpoint     # what it would call
    assert got == [f"backends[1].url: ends in the endpoint path {endpoint}, which hxgwd adds itself "
                   f'(requests would go to {doubled}); use the base URL "{use}"']
    config = load.loads(MINIMAL + f'[[backends]]\nname = "b"\nurl = "{use}"\n')
    assert compile_config(config, 1, environ={}).backends["b"].path(endpoint) == urllib.parse.urlsplit(use).path + endpoint


@pytest.mark.parametrize("url", ["http://h/v1", "http://h/chat", "http://h/embeddings-gw/v1", "http://h/v1/my-completions",
                                 "http://h/completions/v1", "http://h/audio"])
def test_a_backend_url_that_only_looks_like_an_endpoint_passes(url):
    load.loads(MINIMAL + f'[[backends]]\nname = "b"\nurl = "{url}"\n')


def test_check_config_cli_names_the_base_url_for_an_endpoint_url(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + '[[backends]]\nname = "vllm"\nurl = "http://10.0.0.5:8000/v1/chat/completions"\n')
    out = run_cli("--check-config", "-c", str(bad))
    assert out.returncode == 1
    assert 'backends[1].url: ends in the endpoint path /chat/completions' in out.stderr
    assert 'use the base URL "http://10.0.0.5:8000/v1"' in out.stderr


def test_dump_round_trips_and_redacts():
    config = load.load_file(EXAMPLE)
    assert load.loads(dump.dumps(config, redact=False)) == config
    assert load.loads(dump.dumps(config)) == config      # key hashes are no secret: it loads again
    secret = load.loads(MINIMAL + '[database]\nurl = "postgresql://gw:s3cret@db/hx"\n'
                        '[redis]\nurl = "redis://:s3cret@127.0.0.1:6379/0"\n')
    text = dump.dumps(secret)
    assert "s3cret" not in text and "postgresql://gw:<redacted>@db/hx" in text


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hxgwd", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_check_config_cli(tmp_path):
    good = run_cli("--check-config", "-c", EXAMPLE)
    assert good.returncode == 0 and "configuration OK" in good.stdout and "hx-chat" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + '[server]\nlisten = ["x"]\nbogus = 1\n')
    out = run_cli("--check-config", "-c", str(bad))
    assert out.returncode == 1
    assert "server.listen[0]" in out.stderr and "server.bogus: unknown key" in out.stderr
    via_env = run_cli("--check-config", env={"HXGWD_CONFIG": str(bad)})
    assert via_env.returncode == 1
    empty = run_cli("--check-config", "-c", "", env={"HXGWD_CONFIG": EXAMPLE})
    assert empty.returncode == 1 and "cannot read" in empty.stderr


def test_check_config_warns_about_readable_secrets(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-secret")
    os.chmod(key_file, 0o644)
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL + f'[[keys]]\nname = "k"\nkey_file = "{key_file}"\n'
                   f'[redis]\nurl = "redis://127.0.0.1:1"\npassword_file = "{key_file}"\n')
    os.chmod(cfg, 0o600)
    out = run_cli("--check-config", "-c", str(cfg))
    assert out.returncode == 0
    assert "key file of key 'k'" in out.stderr and "readable by other users" in out.stderr
    assert f"redis password file {key_file} is readable" in out.stderr
    assert "config file" not in out.stderr


def test_version_and_genkey():
    out = run_cli("--version")
    assert out.returncode == 0 and re.fullmatch(r"hxgwd \S+ \(http parser: (httptools|h11)\)\n", out.stdout)
    out = run_cli("genkey", "--name", "team-a")
    key = [line for line in out.stdout.splitlines() if line.startswith("sk-hx-")][0]
    assert f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"' in out.stdout
    assert 'name = "team-a"' in out.stdout
    for name in ('x"\nadmin = true\n#', "has space", ""):     # printed into TOML: no quoting games
        out = run_cli("genkey", "--name", name)
        assert out.returncode == 2 and "sk-hx-" not in out.stdout


def test_print_config_effective_and_valid(tmp_path):
    out = run_cli("--print-config", "-c", EXAMPLE)
    assert out.returncode == 0
    assert "keepalive_timeout = 75.0" in out.stdout


def test_check_config_reports_secret_sources_with_every_other_error_in_file_order(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[server]
listen = ["nope"]
[[keys]]
name = "from-env"
key_env = "HX_TEST_CLIENT_KEY"
[[keys]]
name = "bad-hash"
sha256 = "xyz"
[[keys]]
name = "from-file"
key_file = "{tmp_path}/missing-key"
[[backends]]
name = "lit"
url = "ftp://h"
api_key_file = "{tmp_path}/missing-api-key"
[[models]]
name = "m"
backend = "nowhere"
""")
    out = run_cli("--check-config", "-c", str(cfg), env={"HX_TEST_CLIENT_KEY": " "})
    assert out.returncode == 1
    errors = [line.removeprefix("  error: ") for line in out.stderr.splitlines() if line.startswith("  error: ")]
    assert [e.split(": ")[0] for e in errors] == [
        "server.listen[0]", "keys[0].key_env", "keys[1].sha256", "keys[2].key_file",
        "backends[0].url", "backends[0].api_key_file", "models[0].backend"]
    assert "keys[0].key_env: environment variable HX_TEST_CLIENT_KEY is empty" in errors
    assert f"keys[2].key_file: cannot read {tmp_path}/missing-key: No such file or directory" in errors
    assert f"{cfg}: 7 error(s)" in out.stderr


def test_errors_come_in_file_order_whatever_order_the_checks_run_in():
    got = problems('[[backends]]\nname = "b"\nurl = "ftp://h"\n[[models]]\nname = "m"\nbackend = "b"\nweight = 0\n'
                   '[[keys]]\nname = "k"\nsha256 = "BAD"\n[server]\nlisten = ["x"]\n')
    assert [p.split(": ")[0] for p in got] == ["backends[0].url", "models[0].weight", "keys[0].sha256",
                                               "server.listen[0]"]


EXAMPLE_SHA = "8d170aee995d48e15c108cbb5e9f5210c8054eaa4ea7e3c74a8dbde384b5b76a"   # sk-hx-dev-1234


def example_listening_on(tmp_path, *addresses: str, admin: bool = True):
    """hxgwd.toml.example as someone copies it, listening on `addresses`."""
    text = open(EXAMPLE).read()
    listen = ", ".join(f'"{a}"' for a in addresses)
    text = text.replace('listen = ["127.0.0.1:4010"]', f"listen = [{listen}]", 1)
    if not admin:
        text = text.replace("admin = true", "admin = false", 1)
    text = text.replace('url = "sqlite:///hxgwd-dev.db"', f'url = "sqlite:///{tmp_path}/hxgwd.db"', 1)
    path = tmp_path / "hxgwd.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize("listen", [("0.0.0.0:4010",), (":4010",), ("[::]:4010",), ("192.0.2.7:4010",),
                                    ("gw.example.net:4010",), ("127.0.0.1:4010", "0.0.0.0:4011")])
def test_the_public_example_key_is_refused_on_a_listener_that_is_not_loopback(tmp_path, listen):
    """Its key is in the README: on a reachable address, anyone could use it (as admin, as shipped)."""
    for admin in (True, False):         # without admin, still anyone's key to the models and the budget
        got = problems(example_listening_on(tmp_path, *listen, admin=admin).read_text())
        assert [p for p in got if p.startswith("keys[0].sha256: ")] == [
            f"keys[0].sha256: this is the public example key sk-hx-dev-1234; refused while server.listen has "
            f"{[a for a in listen if not a.startswith('127.')][0]!r}, which is not loopback: make a key with "
            "`hxgwd genkey` or `hxgwd keys create`"]


def test_check_config_refuses_the_public_example_key_on_all_interfaces(tmp_path):
    out = run_cli("--check-config", "-c", str(example_listening_on(tmp_path, "0.0.0.0:4010")))
    assert out.returncode == 1
    assert "  error: keys[0].sha256: this is the public example key" in out.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:4010", "127.8.9.10:4010", "[::1]:4010", "localhost:4010"])
def test_the_example_key_on_loopback_is_allowed_with_a_warning(tmp_path, listen):
    out = run_cli("--check-config", "-c", str(example_listening_on(tmp_path, listen)))
    assert out.returncode == 0, out.stderr
    assert ("  warning: key 'dev' is the public example key sk-hx-dev-1234: fine on loopback only; "
            "make real keys with `hxgwd genkey` or `hxgwd keys create`") in out.stderr.splitlines()


def test_the_daemon_refuses_to_start_with_the_public_example_key_on_all_interfaces(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hxgwd", "-c", str(example_listening_on(tmp_path, "0.0.0.0:0"))],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 78
    (line,) = [json.loads(line) for line in out.stderr.splitlines()]
    assert line["msg"] == "invalid config, not starting"
    assert any(p.startswith("keys[0].sha256: this is the public example key") for p in line["problems"])


async def test_the_daemon_logs_config_warnings_at_start_and_keeps_its_config_on_a_public_reload(nursery, tmp_path):
    """What --check-config warns about, the daemon's log says too: the operator who never runs
    --check-config still learns that the config file is world-readable and the key is the example's."""
    import httpx

    from tests.daemon import DaemonProcess

    path = example_listening_on(tmp_path, "127.0.0.1:0")
    os.chmod(path, 0o644)
    daemon = DaemonProcess(str(path))
    try:
        await daemon.start(nursery)
        listening = next(i for i, line in enumerate(daemon.lines) if line.get("msg") == "listening")
        warned = [line["warning"] for line in daemon.lines[:listening]
                  if line.get("msg") == "config warning" and line["level"] == "warning"]
        assert warned == [
            "key 'dev' is the public example key sk-hx-dev-1234: fine on loopback only; make real keys with "
            "`hxgwd genkey` or `hxgwd keys create`",
            f"config file {path} is readable by other users (chmod o-r)"]

        path.write_text(path.read_text().replace('listen = ["127.0.0.1:0"]', 'listen = ["0.0.0.0:0"]'))
        mark = len(daemon.lines)
        daemon.signal(signal.SIGHUP)
        rejected = await daemon.wait_for("reload rejected, still serving the previous config", after=mark)
        assert any(p.startswith("keys[0].sha256: this is the public example key") for p in rejected["problems"])
        async with httpx.AsyncClient(base_url=daemon.url) as client:
            assert (await client.get("/healthz")).json()["generation"] == 1
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        daemon.kill()


@pytest.mark.parametrize("source", ["key_env", "key_file"])
def test_the_public_example_key_is_refused_from_an_env_variable_or_a_file_too(tmp_path, source):
    (tmp_path / "key").write_text("sk-hx-dev-1234\n")
    where = 'key_env = "HX_KEY"' if source == "key_env" else f'key_file = "{tmp_path}/key"'
    text = textwrap.dedent(f"""
        [server]
        listen = ["0.0.0.0:4010"]
        [[keys]]
        name = "dev"
        {where}
    """)
    path = tmp_path / "hxgwd.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    out = run_cli("--check-config", "-c", str(path), env={"HX_KEY": "sk-hx-dev-1234"})
    assert out.returncode == 1
    assert f"  error: keys[0].{source}: this is the public example key sk-hx-dev-1234" in out.stderr
    path.write_text(text.replace("0.0.0.0:4010", "127.0.0.1:4010"))
    assert run_cli("--check-config", "-c", str(path), env={"HX_KEY": "sk-hx-dev-1234"}).returncode == 0
