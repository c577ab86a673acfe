"""The echo's audio and image answers, and the small multipart/form-data parser they need.

Transcriptions and translations read the uploaded file only for its name, size and (for WAV)
duration: the text says what arrived ("Echo transcription of a.wav, 32044 bytes."), so a test sees
that the whole file passed. Speech answers silence, as WAV, raw PCM or MP3, as long as the input's
words would take to say (bounded). Images answer a 1x1 PNG whose colour follows the prompt.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import time
import zlib
from typing import Any, Iterator
from urllib.parse import unquote

from hxgwd.upstream import UpstreamRequest
from hxgwd.upstream.echo_common import (
    WORD, Body, EchoResponse, EchoState, Form, FormFile, error_reply, json_reply, model_of, positive_int,
    sse_reply, word_count,
)

# --- multipart/form-data ------------------------------------------------------------------------

MAX_PARTS = 64
MAX_PART_HEAD = 8192          # bytes of one part's headers
MAX_FIELD = 65536             # bytes of one text field (files are not bounded here: the body is)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;]{1,70}))', re.I)
_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]*))')


def parse_form(body: bytes, content_type: str | None) -> Form:
    """The fields and files of a multipart/form-data body (RFC 7578); ValueError if malformed.
    Without a boundary in `content_type`, the body's first line gives it."""
    found = _BOUNDARY.search(content_type or "")
    if found:
        boundary = (found.group(1) or found.group(2)).encode("latin-1")
    elif body.startswith(b"--") and 2 < body.find(b"\r\n") <= 72:
        boundary = body[2:body.find(b"\r\n")].rstrip(b" \t")
    else:
        raise ValueError("no multipart boundary")
    delimiter = b"--" + boundary
    view = memoryview(body)
    fields: dict[str, Any] = {}
    files: dict[str, FormFile] = {}
    at = body.find(delimiter)
    if at < 0:
        raise ValueError("no multipart delimiter")
    at += len(delimiter)
    for _ in range(MAX_PARTS + 1):
        if body.startswith(b"--", at):
            return Form(fields, files)
        line_end = body.find(b"\r\n", at)
        if line_end < 0 or body[at:line_end].strip(b" \t"):
            raise ValueError("bad multipart delimiter line")
        head_at = line_end + 2
        if body.startswith(b"\r\n", head_at):
            head, data_at = b"", head_at + 2
        else:
            head_end = body.find(b"\r\n\r\n", head_at, head_at + MAX_PART_HEAD)
            if head_end < 0:
                raise ValueError("multipart part headers missing or too long")
            head, data_at = body[head_at:head_end], head_end + 4
        end = body.find(b"\r\n" + delimiter, data_at)
        if end < 0:
            raise ValueError("multipart body not closed")
        _add_part(head, view[data_at:end], fields, files)
        at = end + 2 + len(delimiter)
    raise ValueError(f"more than {MAX_PARTS} multipart parts")


def _add_part(head: bytes, data: memoryview, fields: dict[str, Any], files: dict[str, FormFile]) -> None:
    headers = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        field, _, value = line.partition(":")
        headers[field.strip().lower()] = value.strip()
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(";" + headers.get("content-disposition", "").partition(";")[2])}
    name = params.get("name")
    if name is None:
        return               # not a form field: nothing a server would read
    filename = params.get("filename")
    if params.get("filename*", "").lower().startswith("utf-8''"):
        filename = unquote(params["filename*"][7:])
    if filename is not None:
        files[name] = FormFile(filename, headers.get("content-type", "application/octet-stream"), data)
        return
    if len(data) > MAX_FIELD:
        raise ValueError(f"form field {name!r} longer than {MAX_FIELD} bytes")
    value = bytes(data).decode("utf-8", "replace")
    if name.endswith("[]"):
        fields.setdefault(name, []).append(value)
    else:
        fields[name] = value


# --- transcriptions and translations --------------------------------------------------------

def transcriptions(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    return _speech_to_text(body, "transcribe")


def translations(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    return _speech_to_text(body, "translate")


def _speech_to_text(body: Body, task: str) -> EchoResponse:
    if not isinstance(body, Form):
        return error_reply(400, "The body must be multipart/form-data.")
    upload = body.files.get("file")
    if upload is None:
        return error_reply(400, "'file' is required.", "file")
    model = model_of(body, "whisper-1")
    kind = "transcription" if task == "transcribe" else "translation"
    text = f"Echo {kind} of {upload.filename or 'audio'}, {len(upload.data)} bytes."
    seconds = audio_seconds(upload)
    words = word_count(text)
    # whisper is billed by the second, the gpt-4o transcribers by tokens; translations report none
    usage: dict[str, Any] | None = None
    if task == "transcribe" and "whisper" in model:
        usage = {"type": "duration", "seconds": math.ceil(seconds)}
    elif task == "transcribe":
        prompt_words = word_count(str(body.fields.get("prompt", "")))
        audio_tokens = max(1, math.ceil(seconds * 10))
        usage = {"type": "tokens", "input_tokens": audio_tokens + prompt_words,
                 "input_token_details": {"text_tokens": prompt_words, "audio_tokens": audio_tokens},
                 "output_tokens": words, "total_tokens": audio_tokens + prompt_words + words}
    if task == "transcribe" and body.fields.get("stream") == "true":
        def events() -> Iterator[dict[str, Any]]:
            for i, word in enumerate(WORD.finditer(text)):
                yield {"type": "transcript.text.delta", "delta": word.group() if i == 0 else " " + word.group()}
            yield {"type": "transcript.text.done", "text": text, **({"usage": usage} if usage else {})}
        return sse_reply(events(), done=False)
    form = body.fields.get("response_format", "json")
    if form == "json":
        return json_reply(200, {"text": text, **({"usage": usage} if usage else {})})
    if form == "text":
        return _text_reply(text + "\n", b"text/plain; charset=utf-8")
    if form in ("srt", "vtt"):
        stamp = _stamp(seconds, "," if form == "srt" else ".")
        zero = _stamp(0.0, "," if form == "srt" else ".")
        cue = f"{zero} --> {stamp}\n{text}\n\n"
        return _text_reply(f"1\n{cue}" if form == "srt" else f"WEBVTT\n\n{cue}",
                           b"application/x-subrip" if form == "srt" else b"text/vtt")
    if form == "verbose_json":
        doc: dict[str, Any] = {
            "task": task, "language": "english", "duration": seconds, "text": text,
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                          "tokens": list(range(1, words + 1)), "temperature": 0.0, "avg_logprob": -0.1,
                          "compression_ratio": 1.0, "no_speech_prob": 0.0}]}
        if "word" in body.fields.get("timestamp_granularities[]", []):
            step = seconds / max(1, words)
            doc["words"] = [{"word": w, "start": round(i * step, 3), "end": round((i + 1) * step, 3)}
                            for i, w in enumerate(text.split())]
        if task == "transcribe":
            doc["usage"] = {"type": "duration", "seconds": math.ceil(seconds)}
        return json_reply(200, doc)
    return error_reply(400, f"'response_format' must be json, text, srt, verbose_json or vtt, not {form!r}.",
                       "response_format")


def audio_seconds(upload: FormFile) -> float:
    """A WAV file's duration from its header; any other, its size at 128 kbit/s."""
    data = upload.data
    if len(data) >= 44 and bytes(data[:4]) + bytes(data[8:12]) == b"RIFFWAVE":
        byte_rate: int = struct.unpack_from("<I", data, 28)[0]
        if byte_rate:
            return round((len(data) - 44) / byte_rate, 3)
    return round(len(data) / 16000, 3)


def _stamp(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


def _text_reply(text: str, content_type: bytes) -> EchoResponse:
    return EchoResponse(200, [(b"content-type", content_type)], [text.encode()])


# --- speech -----------------------------------------------------------------------------------

SECONDS_PER_WORD = 0.25
MAX_SPEECH_SECONDS = 30.0     # of silence: a 4,096-character input cannot ask for minutes
PCM_RATE = 24000              # OpenAI's pcm: 24 kHz, 16-bit signed little-endian, mono
_MP3_FRAME = b"\xff\xfb\x90\xc0" + bytes(413)   # MPEG-1 layer III, 128 kbit/s, 44.1 kHz, mono, silent
_MP3_FRAME_SECONDS = 1152 / 44100
SPEECH_TYPES = {"wav": b"audio/wav", "pcm": b"audio/pcm", "mp3": b"audio/mpeg"}
PIECE = 16384


def speech(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    text, voice = body.get("input"), body.get("voice")
    if not isinstance(text, str) or not text:
        return error_reply(400, "'input' must be a non-empty string.", "input")
    if len(text) > 4096:
        return error_reply(400, "'input' must be 4096 characters or fewer.", "input")
    if not (isinstance(voice, str) or isinstance(voice, dict) and isinstance(voice.get("id"), str)):
        return error_reply(400, "'voice' is required.", "voice")
    form = body.get("response_format", "mp3")
    if form not in SPEECH_TYPES:
        return error_reply(400, f"The echo backend speaks wav, pcm or mp3, not {form!r}.", "response_format")
    speed = body.get("speed", 1.0)
    if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0.25 <= speed <= 4.0:
        return error_reply(400, "'speed' must be between 0.25 and 4.0.", "speed")
    seconds = min(MAX_SPEECH_SECONDS, max(1, word_count(text)) * SECONDS_PER_WORD / speed)
    return EchoResponse(200, [(b"content-type", SPEECH_TYPES[form])], _silence(form, seconds), pace=True)


def _silence(form: str, seconds: float) -> Iterator[bytes]:
    """The audio in pieces of 16 KB, each made as it is read: a binary answer streamed back."""
    if form == "mp3":
        frames = math.ceil(seconds / _MP3_FRAME_SECONDS)
        per_piece = PIECE // len(_MP3_FRAME)
        for at in range(0, frames, per_piece):
            yield _MP3_FRAME * min(per_piece, frames - at)
        return
    size = round(seconds * PCM_RATE) * 2
    if form == "wav":
        yield wav_header(size, PCM_RATE)
    for at in range(0, size, PIECE):
        yield bytes(min(PIECE, size - at))


def wav_header(data_bytes: int, rate: int) -> bytes:
    """The 44-byte header of a 16-bit mono PCM WAV file holding `data_bytes` of samples."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))


# --- images -----------------------------------------------------------------------------------

MAX_IMAGES = 10               # OpenAI's own limit for n


def images_generations(body: Body, req: UpstreamRequest, state: EchoState) -> EchoResponse:
    if isinstance(body, Form):
        return error_reply(400, "The body must be JSON.")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return error_reply(400, "'prompt' must be a non-empty string.", "prompt")
    n = body.get("n", 1)
    if not positive_int(n) or n > MAX_IMAGES:
        return error_reply(400, f"'n' must be an integer from 1 to {MAX_IMAGES}.", "n")
    form = body.get("response_format") or "b64_json"
    if form not in ("b64_json", "url"):
        return error_reply(400, "'response_format' must be 'b64_json' or 'url'.", "response_format")
    images = []
    for i in range(n):
        encoded = base64.b64encode(tiny_png(f"{i}:{prompt}")).decode()
        images.append({"b64_json": encoded} if form == "b64_json" else {"url": "data:image/png;base64," + encoded})
    words = word_count(prompt)
    # one output token an image: deterministic, and enough for a test to see n in the usage
    usage = {"input_tokens": words, "input_tokens_details": {"image_tokens": 0, "text_tokens": words},
             "output_tokens": n, "total_tokens": words + n}
    return json_reply(200, {"created": int(time.time()), "data": images, "output_format": "png", "usage": usage})


def tiny_png(seed: str) -> bytes:
    """A valid 1x1 RGB PNG whose colour follows `seed`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    colour = hashlib.sha256(seed.encode()).digest()[:3]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" + colour)) + chunk(b"IEND", b""))

