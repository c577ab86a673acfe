"""h11 reads chunk extensions as `;.*` (anything to the line's end, a bare CR or a control
included); llhttp reads them by RFC 9112 7.1.1's grammar and refuses the rest. Both h11 backends
(server_h11.py, client_h11.py) import this module, which gives h11 llhttp's grammar, as measured
on llhttp: `;name`, `;name=token` or `;name="quoted"` repeated, a name or token possibly empty,
qdtext and quoted-pairs of HTAB, SP, VCHAR and obs-text, no whitespace around `;` or `=`, and not
ending in `;`. Spaces and tabs after the size are taken, as h11 takes them and both llhttp backends
are told to (set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)).

h11 keeps the chunk header's pattern in a module global its ChunkedReader reads; h11 does not
look at the extensions it matches, so only what is taken changes.
"""

from __future__ import annotations

import re

import h11._readers

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
CHUNK_HEADER = re.compile(rb"(?P<chunk_size>[0-9A-Fa-f]{1,20})[ \t]*(?:(?P<chunk_ext>(?:;%s*(?:=(?:%s*|%s))?)+)(?<!;))?\r\n"
                          % (_TOKEN, _TOKEN, _QUOTED))

if not isinstance(getattr(h11._readers, "chunk_header_re", None), re.Pattern):   # pragma: no cover
    from h11._version import __version__    # which h11 does not export by name
    raise ImportError(f"h11 {__version__} reads chunk headers otherwise: see hxgwd/http/h11_chunks.py")
h11._readers.chunk_header_re = CHUNK_HEADER
