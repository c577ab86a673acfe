"""The multipart rewriter: bodies from real encoders, cut at every point; hostile bodies refused
however they are cut; a 20 MB file through in O(piece) memory."""

from __future__ import annotations

import email
import email.policy
import hashlib
import random
import tracemalloc

import httpx
import pytest

from hxgwd.errors import BadRequest
from hxgwd.pipeline import multipart as mp
from hxgwd.pipeline.multipart import MODEL, FormLimits, FormRewriter

B = "XyZ-b0undary"


def httpx_body(data: dict, files: dict, boundary: str | None = B) -> tuple[str, bytes]:
    """What openai-python sends: httpx's encoder, text fields first, then the files."""
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"} if boundary else {}
    request = httpx.Request("POST", "http://h/v1/audio/transcriptions", data=data, files=files, headers=headers)
    return request.headers["content-type"], request.read()


# What openai-node 7.60 (undici's FormData) sends for its documented call, `{file, model, ...}`:
# the file first. Captured from the SDK with a fetch that records the request.
NODE_CT = "multipart/form-data; boundary=----formdata-undici-097560388992"
NODE_BODY = (
    b'------formdata-undici-097560388992\r\nContent-Disposition: form-data; name="file"; filename="speech.wav"\r\n'
    b'Content-Type: application/octet-stream\r\n\r\nRIFF\r\n--audio\r\n------formdata-undici-097560388992\r\n'
    b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n------formdata-undici-097560388992\r\n'
    b'Content-Disposition: form-data; name="language"\r\n\r\nen\r\n------formdata-undici-097560388992\r\n'
    b'Content-Disposition: form-data; name="timestamp_granularities[]"\r\n\r\nword\r\n'
    b'------formdata-undici-097560388992\r\nContent-Disposition: form-data; name="timestamp_granularities[]"\r\n'
    b'\r\nsegment\r\n------formdata-undici-097560388992--\r\n')

# File content full of near misses: CRs, CRLFs, dashes, the boundary without its CRLF, and every
# proper prefix of the delimiter followed by something else.
TRICKY = b"\r\r\n\r\n-\r\n--\r\n--XyZ\n--XyZ-b0undary--XyZ-b0undar\x00" + b"".join(
    (b"\r\n--" + B.encode())[:k] + b"#" for k in range(1, 16)) + b"\r"

BODIES = {
    "openai-python": httpx_body({"model": "whisper-1", "language": "en", "response_format": "verbose_json",
                                 "timestamp_granularities[]": ["word", "segment"], "temperature": "0"},
                                {"file": ("a.mp3", b"ID3\x00\xff" * 50, "audio/mpeg")}),
    "tricky file": httpx_body({"model": "whisper-1", "stream": "true"},
                              {"file": ('we"ird\\name\n.wav', TRICKY, "audio/wav")}),
    "random boundary": httpx_body({"model": "m"}, {"file": ("x", b"\r\n" * 40)}, boundary=None),
    "empty file and field": httpx_body({"model": "whisper-1", "prompt": ""}, {"file": ("e.wav", b"")}),
    "openai-node": (NODE_CT, NODE_BODY),
    "quoted boundary, preamble, epilogue": (
        'Multipart/Form-Data; charset=utf-8; boundary="a b:c"',
        b'\r\n\r\n--a b:c\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--a b:c\r\n'
        b'content-disposition: FORM-DATA ; filename*=UTF-8\'\'%C3%A9t%C3%A9.wav; name="file"\r\n\r\n'
        b'sound\r\n--a b:c--\r\n \t\r\n'),
}


def run(body: bytes, content_type: str, cuts: list[int], model: bytes = b"up/model-Q") -> tuple[FormRewriter, bytes]:
    form = FormRewriter(mp.parse_boundary(content_type))
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(body)]):
        out += form.feed(body[start:end])
    form.end()
    return form, b"".join(mp.render(out, model))


def expected(body: bytes, model: bytes = b"up/model-Q") -> bytes:
    for old in (b"\r\n\r\nwhisper-1\r\n", b"\r\n\r\nm\r\n"):
        if old in body:
            return body.replace(old, b"\r\n\r\n" + model + b"\r\n", 1)
    raise AssertionError("no model in body")


@pytest.mark.parametrize("name", BODIES)
def test_every_split_point_gives_the_same_rewrite(name):
    content_type, body = BODIES[name]
    want = expected(body)
    whole, got = run(body, content_type, [])
    assert got == want
    assert whole.upstream_length(len(body), b"up/model-Q") == len(want)
    assert whole.bytes_in == len(body)
    for cut in range(len(body) + 1):
        form, got = run(body, content_type, [cut])
        assert got == want, cut
        assert (form.model, form.fields, form.files) == (whole.model, whole.fields, whole.files)
    assert run(body, content_type, list(range(1, len(body))))[1] == want
    rng = random.Random(16)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(1, 12)))
        assert run(body, content_type, cuts)[1] == want


@pytest.mark.parametrize("name", BODIES)
def test_another_parser_reads_what_was_sent_as_it_was_read(name):
    """The stdlib's MIME parser, on the body sent upstream: the same parts, in order, with the new model."""
    content_type, body = BODIES[name]
    form, sent = run(body, content_type, [])
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + sent,
                                       policy=email.policy.HTTP)
    parts = [(p.get_param("name", header="content-disposition"), p.get_payload(decode=True))
             for p in message.iter_parts()]
    assert not message.defects
    assert [(n, v.decode()) for n, v in parts if n != "file"] == [
        (n, "up/model-Q" if n == "model" else v) for n, v in form.fields]
    assert [len(v) for n, v in parts if n == "file"] == [f.size for f in form.files]


def test_fields_files_and_what_was_read():
    form, _ = run(*reversed(BODIES["openai-python"]), [])
    assert form.model == "whisper-1" and form.stream is None and not form.model_after_file
    assert form.fields == [("model", "whisper-1"), ("language", "en"), ("response_format", "verbose_json"),
                           ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment"),
                           ("temperature", "0")]
    assert form.files == [mp.FilePart("file", "a.mp3", "audio/mpeg", 250)]
    form, _ = run(*reversed(BODIES["tricky file"]), [])
    assert form.stream is True and form.files[0].size == len(TRICKY)
    assert form.files[0].filename == 'we%22ird\\name%0A.wav'     # httpx: %22 and %0A, and \\ undone
    form, _ = run(*reversed(BODIES["quoted boundary, preamble, epilogue"]), [])
    assert form.files == [mp.FilePart("file", "été.wav", None, 5)]


def test_model_known_before_the_file_arrives():
    content_type, body = BODIES["openai-python"]
    form = FormRewriter(mp.parse_boundary(content_type))
    file_starts = body.index(b"ID3")
    form.feed(body[:file_starts + 10])
    assert form.model == "whisper-1" and form.files[0].filename == "a.mp3" and not form.done
    assert form.upstream_length(len(body), b"x") == len(body) - len("whisper-1") + 1


def test_model_after_the_file_is_said_so():
    form = FormRewriter(mp.parse_boundary(NODE_CT))
    cut = NODE_BODY.index(b"RIFF") + 2
    held = form.feed(NODE_BODY[:cut])
    assert form.model_after_file and form.model is None and form.files[0].name == "file"
    with pytest.raises(RuntimeError):
        form.upstream_length(len(NODE_BODY), b"x")
    held += form.feed(NODE_BODY[cut:])
    form.end()
    assert form.model == "whisper-1" and form.model_after_file and held.count(MODEL) == 1


def test_file_content_is_passed_through_as_views_of_the_input():
    content_type, body = httpx_body({"model": "m"}, {"file": ("f", b"\x01" * 100_000)})
    form = FormRewriter(mp.parse_boundary(content_type))
    out = form.feed(body)
    views = [p for p in out if isinstance(p, memoryview)]
    assert views and all(v.obj is body for v in views) and sum(map(len, views)) == 100_000


def test_model_bytes_and_render():
    assert mp.model_bytes("llama-3.1/8b-é") == "llama-3.1/8b-é".encode()
    with pytest.raises(ValueError):
        mp.model_bytes("a\r\n--x")
    assert list(mp.render([b"a", MODEL, b"c"], b"B")) == [b"a", b"B", b"c"]


@pytest.mark.parametrize("content_type, boundary", [
    ("multipart/form-data; boundary=abc", b"abc"),
    ("multipart/form-data;boundary=abc;charset=utf-8", b"abc"),
    ('MULTIPART/FORM-DATA; BOUNDARY="a b(c)+_,-./:=?"', b"a b(c)+_,-./:=?"),
    (b"multipart/form-data; boundary=" + b"x" * 70, b"x" * 70),
    ("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", b"----WebKitFormBoundary7MA4YWxkTrZu0gW"),
])
def test_boundary_accepted(content_type, boundary):
    assert mp.parse_boundary(content_type) == boundary


@pytest.mark.parametrize("content_type", [
    None, "", "application/json", "multipart/mixed; boundary=abc", "multipart/form-data",
    "multipart/form-data; boundary=", 'multipart/form-data; boundary=""', "multipart/form-data; boundary=" + "x" * 71,
    'multipart/form-data; boundary="ends with space "', 'multipart/form-data; boundary="semi;colon"',
    "multipart/form-data; boundary=a; boundary=b", "multipart/form-data; boundary=é",
    'multipart/form-data; boundary="a\\"b"', "multipart/form-data; boundary=abc junk",
])
def test_boundary_refused(content_type):
    with pytest.raises(BadRequest) as caught:
        mp.parse_boundary(content_type)
    assert caught.value.code == "invalid_content_type" and caught.value.param == "content-type"
    assert caught.value.status == 400


def part(head: str, value: bytes = b"v") -> bytes:
    return b"--b\r\n" + head.encode() + b"\r\n\r\n" + value + b"\r\n"


MODEL_PART = part('Content-Disposition: form-data; name="model"', b"whisper-1")
FILE_PART = part('Content-Disposition: form-data; name="file"; filename="a.wav"', b"RIFF")
END = b"--b--\r\n"

HOSTILE = {
    "no closing boundary": (MODEL_PART + FILE_PART, "invalid_multipart"),
    "cut inside a head": (MODEL_PART + b"--b\r\nContent-Disposition: form-da", "invalid_multipart"),
    "cut inside a boundary": (MODEL_PART + FILE_PART + b"--", "invalid_multipart"),
    "nothing at all": (b"", "invalid_multipart"),
    "too many parts": (MODEL_PART + part('Content-Disposition: form-data; name="x"') * 64 + END, "invalid_multipart"),
    "head over the limit": (part('Content-Disposition: form-data; name="x"\r\nX-Pad: ' + "p" * 8200) + END,
                            "invalid_multipart"),
    "head with no end": (b"--b\r\n" + b"X-Pad: p\r\n" * 2000, "invalid_multipart"),
    "field over the limit": (part('Content-Disposition: form-data; name="prompt"', b"w" * 65537) + END,
                             "invalid_multipart"),
    "fields over the limit in all": (part('Content-Disposition: form-data; name="p"', b"w" * 60000) * 5 + END,
                                     "invalid_multipart"),
    "LF line ends": (MODEL_PART.replace(b"\r\n", b"\n") + END, "invalid_multipart"),
    "LF line ends in a head": (b'--b\r\nContent-Disposition: form-data; name="model"\nX: y\r\n\r\nm\r\n' + END,
                               "invalid_multipart"),
    "CR alone in a head": (b'--b\r\nContent-Disposition: form-data; name="model"\rX: y\r\n\r\nm\r\n' + END,
                           "invalid_multipart"),
    "transport padding": (MODEL_PART.replace(b"--b\r\n", b"--b \r\n") + END, "invalid_multipart"),
    "boundary inside a part": (part('Content-Disposition: form-data; name="file"; filename="a"', b"x\r\n--bX") + END,
                               "invalid_multipart"),
    "preamble text": (b"This is a multi-part message.\r\n" + MODEL_PART + END, "invalid_multipart"),
    "preamble LF": (b"\n" + MODEL_PART + END, "invalid_multipart"),
    "long blank preamble": (b"\r\n" * 600 + MODEL_PART + END, "invalid_multipart"),
    "preamble that looks like a part": (b"x" + MODEL_PART + MODEL_PART + END, "invalid_multipart"),
    "epilogue text": (MODEL_PART + END + b"\r\n" + MODEL_PART, "invalid_multipart"),
    "long blank epilogue": (MODEL_PART + END + b" " * 1100, "invalid_multipart"),
    "model twice": (MODEL_PART + MODEL_PART + END, "ambiguous_parameter"),
    "model after the file, twice": (MODEL_PART + FILE_PART + MODEL_PART + END, "ambiguous_parameter"),
    "stream twice": (part('Content-Disposition: form-data; name="stream"', b"true") * 2 + END, "ambiguous_parameter"),
    "MODEL": (part('Content-Disposition: form-data; name="MODEL"', b"x") + MODEL_PART + END, "ambiguous_parameter"),
    "Model as a file": (part('Content-Disposition: form-data; name="Model"; filename="m"') + END,
                        "ambiguous_parameter"),
    "long s stream": (part('Content-Disposition: form-data; name="ſtream"', b"true") + END, "ambiguous_parameter"),
    "escaped model": (part('Content-Disposition: form-data; name="mo\\del"', b"x") + END, "ambiguous_parameter"),
    "escaped name model": (part('Content-Disposition: form-data; name="\\model"', b"x") + END, "ambiguous_parameter"),
    "model as a file": (part('Content-Disposition: form-data; name="model"; filename="m.txt"') + END,
                        "invalid_multipart"),
    "name*": (part("Content-Disposition: form-data; name=\"x\"; name*=UTF-8''model") + END, "invalid_multipart"),
    "name twice": (part('Content-Disposition: form-data; name="x"; name="model"') + END, "invalid_multipart"),
    "disposition twice": (part('Content-Disposition: form-data; name="x"\r\nContent-Disposition: form-data; '
                               'name="model"') + END, "invalid_multipart"),
    "no disposition": (part("Content-Type: text/plain") + END, "invalid_multipart"),
    "no name": (part("Content-Disposition: form-data; filename=\"a\"") + END, "invalid_multipart"),
    "not form-data": (part('Content-Disposition: attachment; name="model"') + END, "invalid_multipart"),
    "empty head": (b"--b\r\n\r\nvalue\r\n" + END, "invalid_multipart"),
    "folded header": (part('Content-Disposition: form-data;\r\n name="model"', b"m") + END, "invalid_multipart"),
    "header without colon": (part('Content-Disposition: form-data; name="x"\r\nX-Bad') + END, "invalid_multipart"),
    "base64 part": (part('Content-Disposition: form-data; name="model"\r\nContent-Transfer-Encoding: base64',
                         b"bW9kZWw=") + END, "invalid_multipart"),
    "model in UTF-16": (part('Content-Disposition: form-data; name="model"\r\nContent-Type: text/plain; '
                             'charset=utf-16', "m".encode("utf-16")) + END, "invalid_multipart"),
    "model not UTF-8": (part('Content-Disposition: form-data; name="model"', b"\xff\xfe") + END, "invalid_multipart"),
    "head not UTF-8": (b'--b\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nv\r\n' + END, "invalid_multipart"),
    "stream neither true nor false": (part('Content-Disposition: form-data; name="stream"', b"yes") + END,
                                      "invalid_value"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_body_refused_however_it_is_cut(name):
    body, code = HOSTILE[name]
    for cuts in ([], list(range(1, len(body))) if len(body) < 4000 else list(range(1, len(body), 97))):
        form = FormRewriter(b"b")
        with pytest.raises(BadRequest) as caught:
            for start, end in zip([0, *cuts], [*cuts, len(body)]):
                form.feed(body[start:end])
            form.end()
        assert caught.value.code == code and caught.value.status == 400, (name, cuts[:1])
        assert b'"code":"%s"' % code.encode() in caught.value.body()


def test_limits_are_settings():
    body = part('Content-Disposition: form-data; name="prompt"', b"w" * 100) + END
    FormRewriter(b"b").feed(body)
    with pytest.raises(BadRequest):
        FormRewriter(b"b", FormLimits(max_field_bytes=99)).feed(body)


@pytest.mark.parametrize("body", [
    b"\r\n" + MODEL_PART + END,                                        # a blank preamble
    MODEL_PART + b"--b--",                                             # no CRLF after the end
    MODEL_PART + END + b"\r\n\t \r\n",                                 # a blank epilogue
    MODEL_PART + part('Content-Disposition: form-data; name="x"', b"") + END,    # an empty field
    part('Content-Disposition: form-data; name="model"\r\nContent-Type: text/plain; charset=UTF-8', b"m") + END,
])
def test_odd_but_unambiguous_bodies_pass_unchanged(body):
    form = FormRewriter(b"b")
    out = form.feed(body)
    form.end()
    assert form.model and b"".join(mp.render(out, form.model.encode())) == body


@pytest.mark.parametrize("body", [END, FILE_PART + END, b"\r\n" + FILE_PART + b"--b--"])
def test_a_form_without_model_gets_one_at_its_end(body):
    """Routed by X-HX-Model-Group: the upstream still needs the deployment's name."""
    form = FormRewriter(b"b")
    out = form.feed(body)
    form.end()
    assert form.model is None and form.model_added
    sent = b"".join(mp.render(out, b"up"))
    assert sent == body.replace(b"--b--", b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nup\r\n--b--')
    assert form.upstream_length(len(body), b"up") == len(sent)
    again = FormRewriter(b"b")
    again.feed(sent)
    again.end()
    assert again.model == "up" and not again.model_added and again.files == form.files


def test_twenty_megabytes_in_o_piece_memory():
    size, piece = 20 * 1024 * 1024, 64 * 1024
    content = random.Random(20).randbytes(1 << 16) * (size >> 16)
    content_type, head = httpx_body({"model": "whisper-1", "language": "en"}, {"file": ("big.wav", b"@@")})
    at = head.index(b"@@")
    body = head[:at] + content + head[at + 2:]
    del content
    want = hashlib.sha256(expected(body, b"up")).hexdigest()
    tracemalloc.start()
    try:
        form = FormRewriter(mp.parse_boundary(content_type))
        digest = hashlib.sha256()
        for start in range(0, len(body), piece):
            for out in mp.render(form.feed(body[start:start + piece]), b"up"):
                digest.update(out)
        form.end()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == want and form.files[0].size == size
    assert peak < 4 * piece, peak          # the piece being fed and its slice: nothing of the file kept
