"""The issue's acceptance sequence, with curl, against the daemon process and real upstream sockets:
a chat upstream standing in for LiteLLM and an embeddings upstream that accepts only `prompt`."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import trio

from tests.daemon import DaemonProcess
from tests.fakeupstream import FakeUpstream

KEY = "sk-hx-dev-1234"


async def curl(*args: str) -> str:
    result = await trio.run_process(["curl", "-s", "--max-time", "10", *args], capture_stdout=True)
    return result.stdout.decode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_acceptance_sequence(nursery, tmp_path):
    litellm = FakeUpstream(name="litellm")
    ollama = FakeUpstream(name="ollama", prompt_only_embeddings=True, dimensions=1024)
    await nursery.start(litellm.serve)
    await nursery.start(ollama.serve)
    path = tmp_path / "hxgwd.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        listen = ["127.0.0.1:0"]
        [database]
        url = ""
        [[keys]]
        name = "dev"
        sha256 = "8d170aee995d48e15c108cbb5e9f5210c8054eaa4ea7e3c74a8dbde384b5b76a"
        [[backends]]
        name = "litellm"
        url = "{litellm.url}"
        api_key_env = "LITELLM_KEY"
        [[backends]]
        name = "ollama"
        url = "{ollama.url}"
        embeddings_input = "prompt"
        [[models]]
        name = "hx-chat-small"
        backend = "litellm"
        upstream_model = "llama3-8b"
        [[models]]
        name = "hx-chat-large"
        backend = "litellm"
        [[models]]
        name = "emb-premium"
        backend = "ollama"
        kind = "embedding"
        [groups.hx-chat]
        models = ["hx-chat-small", "hx-chat-large"]
    """))
    daemon = DaemonProcess(str(path), env={"LITELLM_KEY": "sk-litellm-master"})
    await daemon.start(nursery)
    base = daemon.url
    auth = f"Authorization: Bearer {KEY}"
    try:
        assert json.loads(await curl(f"{base}/healthz"))["ok"] is True
        assert len(json.loads(await curl(f"{base}/v1/models", "-H", auth))["data"]) > 0
        emb = json.loads(await curl(f"{base}/v1/embeddings", "-H", auth, "-H", "Content-Type: application/json",
                                    "-d", '{"model":"emb-premium","input":"HX-OK"}'))
        assert len(emb["data"][0]["embedding"]) == 1024
        chat = json.loads(await curl(
            f"{base}/v1/chat/completions", "-H", auth, "-H", "Content-Type: application/json",
            "-H", "X-HX-Model-Group: hx-chat",
            "-d", '{"messages":[{"role":"user","content":"Return exactly the text: HX-OK"}],'
                  '"temperature":0,"max_tokens":10}'))
        assert chat["choices"][0]["message"]["content"] == "HX-OK"
        assert ollama.requests[-1].json == {"model": "emb-premium", "prompt": "HX-OK"}
        assert litellm.requests[-1].headers["authorization"] == "Bearer sk-litellm-master"

        await litellm.refuse()          # every upstream down: the registry still answers
        await ollama.refuse()
        assert len(json.loads(await curl(f"{base}/v1/models", "-H", auth))["data"]) == 4
    finally:
        daemon.kill()
