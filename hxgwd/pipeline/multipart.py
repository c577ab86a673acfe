"""multipart/form-data request bodies (RFC 7578, RFC 2046), rewritten as they stream: the audio
endpoints' uploads. Sans I/O: the caller feeds the client's body in pieces as they arrive and sends
upstream the pieces it gets back.

The output is the input byte for byte, except for the `model` field's value, which comes out as the
MODEL slot: the caller writes the deployment's upstream name there (`render`) once it has routed. A
form without a model field (routed by the X-HX-Model-Group header) gets one, added as its last part.
The slot, rather than a name given up front, lets a caller route on the model it read, hold the
pieces it was given before then, and write them again for another deployment on failover. File
content comes out as memoryview slices of the pieces fed (never joined, never copied); only part
heads, text fields and the few bytes that may begin a boundary are held, each within FormLimits.

Which parser an upstream runs is unknown (python-multipart, Go's mime/multipart, busboy, cpp-httplib
...), and they disagree on malformed bodies: a body that one reads as `model=a` could be
`model=b` to another. So the reading here is strict, and anything two parsers could read in two ways
is refused with a 400 rather than forwarded: line ends other than CRLF (every encoder writes CRLF;
accepting LF alone is where parsers split over where a part begins), transport padding after a
boundary (RFC 2046 forbids composers to write it, HTTP adds none), a boundary followed by anything
but CRLF or "--" (the boundary then occurs inside a part), a preamble other than blank lines, an
epilogue other than white space, a repeated header in a part head, obsolete line folding, `name*`,
a transfer encoding, a guarded field (`model`, `stream`) sent twice, as a file, in another charset,
or under a name that only case-folds to it or reads as it once escapes are undone (`ambiguous_parameter`,
as transform.ambiguous_key does for JSON). Blank preamble and white-space epilogue are forwarded
unchanged, so that the upstream length is the client's plus the model's change (`upstream_length`).

Field order: openai-python (through httpx) writes every text field before the files, so `model`
arrives first and the gateway can route before the file does. openai-node (7.60, checked) appends
fields in the order of the caller's object, and its documented call is `{file, model}`: the file
comes first. OpenAI's curl examples (`-F file=@... -F model=...`) do the same. `model_after_file`
says so. Refusing that would refuse the Node SDK's documented call, so the caller holds the pieces it
was given (slices of the client's pieces: the file once, never twice) until the model is read,
within its body limit, and then sends them; a body too large to hold is the body limit's 413.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Iterator

import attrs

from hxgwd.errors import BadRequest

# Form fields the gateway routes or answers by: read here, so one reading must be the only one.
GUARDED_FIELDS = frozenset(("model", "stream"))


class ModelSlot:
    """Where the `model` field's value goes in the output: the upstream name, written by the caller."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MODEL"


MODEL = ModelSlot()
Piece = bytes | memoryview | ModelSlot


@attrs.frozen
class FormLimits:
    max_parts: int = 64
    max_head_bytes: int = 8 * 1024        # one part's header block
    max_field_bytes: int = 64 * 1024      # one text field's value
    max_fields_bytes: int = 256 * 1024    # all text fields' values together
    max_blank_bytes: int = 1024           # preamble, epilogue


@attrs.define
class FilePart:
    name: str
    filename: str | None
    content_type: str | None
    size: int = 0                          # bytes of content, so far


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA = re.compile(rf"[ \t]*({_TOKEN}(?:/{_TOKEN})?)[ \t]*")
_PARAM = re.compile(rf'[ \t]*;[ \t]*({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\\r\n]|\\[^\r\n])*)"|({_TOKEN}))[ \t]*')
_UNESCAPE = re.compile(r"\\(.)")
_HEADER_NAME = re.compile(_TOKEN)
# RFC 2046 5.1.1: 1-70 bchars, the last not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


_NO_PREAMBLE = "The multipart body must begin with its boundary (no preamble), with CRLF line ends."


def _bad(message: str, param: str | None = None, code: str = "invalid_multipart") -> BadRequest:
    return BadRequest(message, param=param, code=code)


def _parameters(text: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """A header value `type; key=value; ...`: the type, lowercased, and each parameter's value
    (quoted-string escapes undone) with its text as sent. ValueError on bad syntax or a parameter
    given twice (readers differ on which one counts)."""
    media = _MEDIA.match(text)
    if media is None:
        raise ValueError("no type")
    params: dict[str, tuple[str, str]] = {}
    at = media.end()
    while at < len(text):
        param = _PARAM.match(text, at)
        if param is None:
            if text[at:].strip(" \t") == ";":
                break
            raise ValueError("bad parameter")
        key, quoted, token = param[1].lower(), param[2], param[3]
        if key in params:
            raise ValueError("parameter given twice")
        params[key] = (_UNESCAPE.sub(r"\1", quoted), quoted) if quoted is not None else (token, token)
        at = param.end()
    return media[1].lower(), params


def parse_boundary(content_type: bytes | str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, or BadRequest."""
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type or ""
    try:
        media, params = _parameters(text)
    except ValueError:
        media, params = "", {}
    if media != "multipart/form-data":
        raise _bad("This endpoint takes a multipart/form-data body.", "content-type", "invalid_content_type")
    boundary = params.get("boundary", ("", ""))[0]
    if not _BOUNDARY.fullmatch(boundary):
        raise _bad("The multipart/form-data Content-Type needs a boundary of 1 to 70 characters "
                   "(RFC 2046).", "content-type", "invalid_content_type")
    return boundary.encode("ascii")


def model_bytes(upstream_model: str) -> bytes:
    """An upstream name as the model field's value. A config name with a line break could end the
    field early: not a name any backend has, refused rather than written."""
    if "\r" in upstream_model or "\n" in upstream_model:
        raise ValueError("an upstream model name cannot contain a line break")
    return upstream_model.encode("utf-8")


def render(pieces: Iterable[Piece], model: bytes) -> Iterator[bytes | memoryview]:
    """The pieces to send, with `model` (model_bytes) in the slot. It is there once: where the form's
    model field was, or in a field added before the closing boundary when the form had none."""
    for piece in pieces:
        yield model if isinstance(piece, ModelSlot) else piece


# A form without a model field (routed by X-HX-Model-Group) gets one before its closing boundary.
_ADDED_MODEL_HEAD = b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'

# where the bytes between two boundaries go
_PREAMBLE, _FIELD, _FILE = range(3)
# what the parser expects next
_CONTENT, _AFTER_BOUNDARY, _HEAD, _EPILOGUE = range(4)


class FormRewriter:
    """One multipart body's reading and rewriting. `feed` each piece of the client's body (bytes;
    not changed afterwards: the output may be slices of it), then `end`; each raises BadRequest on
    a body refused as above, after which the rewriter is not to be used again.

    What was read is there as it is read: `fields` (text fields in order, value as text), `model`
    and `stream` as soon as their fields are complete, `files` from their part heads on,
    `model_after_file`, `done` once the closing boundary is in, `model_added`, `bytes_in`."""

    def __init__(self, boundary: bytes, limits: FormLimits | None = None) -> None:
        self.limits = limits or FormLimits()
        self.fields: list[tuple[str, str]] = []
        self.files: list[FilePart] = []
        self.model: str | None = None
        self.stream: bool | None = None
        self.model_after_file = False     # a file part began before any model field was complete
        self.done = False                 # the closing boundary is in
        self.model_added = False          # the form had no model field: one was added before its end
        self.bytes_in = 0
        self._delimiter = b"\r\n--" + boundary
        self._model_len = 0
        self._state = _CONTENT
        self._sink = _PREAMBLE
        # The body's first boundary has no CRLF before it: as if there were one, not sent on.
        self._carry = b"\r\n"             # the bytes at the end of the last piece that may begin a delimiter
        self._carry_virtual = True
        self._held = bytearray()          # a part head, a text field, the preamble, two bytes after a boundary
        self._field_name = ""
        self._parts = 0
        self._fields_bytes = 0
        self._epilogue_bytes = 0

    def feed(self, data: bytes) -> list[Piece]:
        """The output that these bytes complete, in order: bytes, memoryview slices of `data`, MODEL."""
        out: list[Piece] = []
        self.bytes_in += len(data)
        view = memoryview(data)
        at = 0
        while at < len(data):
            if self._state == _CONTENT:
                at = self._content(data, view, at, out)
            elif self._state == _AFTER_BOUNDARY:
                at = self._after_boundary(data, at, out)
            elif self._state == _HEAD:
                at = self._head(data, at, out)
            else:
                self._epilogue(view[at:], out)
                at = len(data)
        return out

    def end(self) -> None:
        """The body is complete: BadRequest unless its closing boundary came."""
        if not self.done:
            raise _bad("The multipart body ended before its closing boundary.")

    def upstream_length(self, client_length: int, model: bytes) -> int:
        """The Content-Length to send upstream for a client's Content-Length: known once the model
        field is read (before then, send chunked or wait)."""
        if self.model is not None:
            return client_length - self._model_len + len(model)
        if self.model_added:
            return client_length + len(_ADDED_MODEL_HEAD) + len(model) + len(self._delimiter)
        raise RuntimeError("the model field has not been read yet")

    # -- between boundaries ---------------------------------------------------------------------

    def _content(self, data: bytes, view: memoryview, at: int, out: list[Piece]) -> int:
        delimiter = self._delimiter
        if self._carry:
            # A delimiter can begin only at the start of the carry: its one CR is its first byte.
            held = len(self._carry)
            seam = data[at:at + len(delimiter) - held]
            if seam == delimiter[held:held + len(seam)]:
                if held + len(seam) < len(delimiter):
                    self._carry += seam
                    return at + len(seam)
                self._boundary(out, delimiter[2:] if self._carry_virtual else delimiter)
                return at + len(seam)
            self._content_bytes(self._carry[2:] if self._carry_virtual else self._carry, out)
            self._carry, self._carry_virtual = b"", False
        found = data.find(delimiter, at)
        if found >= 0:
            self._content_bytes(view[at:found], out)
            self._boundary(out, delimiter)
            return found + len(delimiter)
        end = len(data)
        cr = data.rfind(b"\r", max(at, end - len(delimiter) + 1))
        if cr >= 0 and delimiter.startswith(data[cr:]):
            end = cr
            self._carry = data[cr:]
        self._content_bytes(view[at:end], out)
        return len(data)

    def _content_bytes(self, chunk: bytes | memoryview, out: list[Piece]) -> None:
        if not chunk:
            return
        if self._sink == _FILE:
            out.append(chunk)
            self.files[-1].size += len(chunk)
        elif self._sink == _FIELD:
            if len(self._held) + len(chunk) > self.limits.max_field_bytes:
                raise _bad(f"The form field '{self._field_name[:64]}' is over "
                           f"{self.limits.max_field_bytes} bytes; send files with a filename.", self._field_name[:256])
            self._fields_bytes += len(chunk)
            if self._fields_bytes > self.limits.max_fields_bytes:
                raise _bad(f"The form's text fields are over {self.limits.max_fields_bytes} bytes in all.")
            self._held += chunk
        else:
            if len(self._held) + len(chunk) > self.limits.max_blank_bytes:
                raise _bad(_NO_PREAMBLE)
            self._held += chunk

    def _boundary(self, out: list[Piece], delimiter: bytes) -> None:
        """A delimiter ended the content: what it ended goes out, then the delimiter."""
        if self._sink == _PREAMBLE and self._held != b"\r\n" * (len(self._held) // 2):
            raise _bad(_NO_PREAMBLE)
        if self._held:
            out.append(self._field_done(bytes(self._held)) if self._sink == _FIELD else bytes(self._held))
            self._held = bytearray()
        elif self._sink == _FIELD:
            out.append(self._field_done(b""))
        out.append(delimiter)
        self._carry, self._carry_virtual = b"", False
        self._state = _AFTER_BOUNDARY

    def _field_done(self, value: bytes) -> Piece:
        name = self._field_name
        if name not in GUARDED_FIELDS:
            self.fields.append((name, value.decode("utf-8", "replace")))
            return value
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"The form field '{name}' must be UTF-8 text.", name) from None
        self.fields.append((name, text))
        if name == "stream":
            if text not in ("true", "false"):
                raise _bad("The form field 'stream' must be true or false.", "stream", "invalid_value")
            self.stream = text == "true"
            return value
        self.model, self._model_len = text, len(value)
        return MODEL

    # -- boundary lines and part heads ----------------------------------------------------------

    def _after_boundary(self, data: bytes, at: int, out: list[Piece]) -> int:
        take = data[at:at + 2 - len(self._held)]
        self._held += take
        if len(self._held) < 2:
            return at + len(take)
        ending = bytes(self._held)
        if ending == b"--":
            if self.model is None:      # so the upstream has the deployment's name all the same
                out += (_ADDED_MODEL_HEAD, MODEL, self._delimiter)
                self.model_added = True
            self.done = True
            self._state = _EPILOGUE
            self._held = bytearray()
        elif ending == b"\r\n":
            self._parts += 1
            if self._parts > self.limits.max_parts:
                raise _bad(f"The form has more than {self.limits.max_parts} parts.")
            self._state = _HEAD
            self._held = bytearray(b"\r\n")     # so that a head without headers ends at its first CRLF
        else:
            raise _bad("A multipart boundary must be followed by CRLF or '--': the boundary occurs "
                       "inside a part, or the body does not use CRLF line ends.")
        out.append(ending)
        return at + len(take)

    def _head(self, data: bytes, at: int, out: list[Piece]) -> int:
        before = len(self._held)
        chunk = data[at:at + self.limits.max_head_bytes + 4]
        self._held += chunk
        end = self._held.find(b"\r\n\r\n", max(0, before - 3))
        if end < 0 or end > self.limits.max_head_bytes + 2:
            if len(self._held) > self.limits.max_head_bytes + 4:
                raise _bad(f"A part's headers are over {self.limits.max_head_bytes} bytes.")
            return at + len(chunk)
        out.append(bytes(self._held[2:end + 4]))
        self._part(bytes(self._held[2:end]))
        self._held = bytearray()
        self._state = _CONTENT
        return at + end + 4 - before

    def _part(self, block: bytes) -> None:
        try:
            lines = block.decode("utf-8").split("\r\n") if block else []
        except UnicodeDecodeError:
            raise _bad("A part's headers must be UTF-8.") from None
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name) or "\r" in value or "\n" in value:
                raise _bad("A part's header is malformed (each is 'Name: value' and ends with CRLF).")
            if name.lower() in headers:
                raise _bad(f"A part has the header '{name[:64]}' twice.")
            headers[name.lower()] = value.strip(" \t")
        try:
            kind, params = _parameters(headers.get("content-disposition", ""))
        except ValueError:
            kind, params = "", {}
        if kind != "form-data" or "name" not in params:
            raise _bad("Each part needs one 'Content-Disposition: form-data; name=\"...\"' header, "
                       "with each parameter once.")
        if "name*" in params:
            raise _bad("A part's name is given as name* (RFC 7578 4.2 says not to): give name only.")
        if headers.get("content-transfer-encoding", "binary").lower() not in ("7bit", "8bit", "binary"):
            raise _bad("Parts cannot have a Content-Transfer-Encoding (RFC 7578 4.7).")
        name, raw = params["name"]
        self._guard(name, raw)
        content_type = headers.get("content-type")
        if "filename" in params or "filename*" in params:
            if name in GUARDED_FIELDS:
                raise _bad(f"The form field '{name}' must be text, not a file.", name)
            self.model_after_file |= self.model is None
            self.files.append(FilePart(name, _filename(params), content_type))
            self._sink = _FILE
            return
        if name in GUARDED_FIELDS:
            if any(seen == name for seen, _ in self.fields):
                raise _bad(f"The form field '{name}' is given twice: give it once.", name, "ambiguous_parameter")
            if content_type is not None and not _utf8_text(content_type):
                raise _bad(f"The form field '{name}' must be text/plain in UTF-8.", name)
        self._field_name = name
        self._sink = _FIELD

    def _guard(self, name: str, raw: str) -> None:
        """A name that a backend could read as a guarded field, though it is not exactly one:
        `MODEL`, `ſtream`, or `mo\\del` (model to a reader that undoes escapes, not to one that
        does not)."""
        for reading in (name, raw):
            folded = reading.casefold()
            if folded in GUARDED_FIELDS and (reading != folded or name != raw):
                raise _bad(f"The form field '{raw[:64]}' could be read as '{folded}': use the exact "
                           "lowercase name, once.", raw[:256], "ambiguous_parameter")

    def _epilogue(self, chunk: memoryview, out: list[Piece]) -> None:
        self._epilogue_bytes += len(chunk)
        if self._epilogue_bytes > self.limits.max_blank_bytes or bytes(chunk).strip(b" \t\r\n"):
            raise _bad("Nothing but white space may follow the closing boundary of a multipart body.")
        out.append(bytes(chunk))


def _utf8_text(content_type: str) -> bool:
    try:
        media, params = _parameters(content_type)
    except ValueError:
        return False
    return media == "text/plain" and params.get("charset", ("utf-8", ""))[0].lower() in ("utf-8", "us-ascii")


def _filename(params: dict[str, tuple[str, str]]) -> str | None:
    """The file's name, for logs: filename* (RFC 8187) when given, else filename."""
    if "filename*" in params:
        charset, _, rest = params["filename*"][0].partition("'")
        _, _, encoded = rest.partition("'")
        try:
            return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except LookupError:
            return encoded
    return params["filename"][0]
