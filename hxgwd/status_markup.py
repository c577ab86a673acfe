"""The status page's HTML parts (status_page.py): markup built from escaped text only, the value
formats, and the stylesheet.

`esc` escapes everything that is not already `Html` made here: causes and store errors quote what
upstreams and databases said, a failed request's model is what the client sent.
"""

from __future__ import annotations

import html
import time
from typing import Any, Iterable

from hxgwd.errors import capped

SHOWN_CHARS = 300                # of a cause or an error: the rest is cut (capped() says so)


class Html(str):
    """Markup made here, from escaped parts: `esc` passes it as is. Anything else is text."""


def esc(value: object) -> Html:
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("–")
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, list):
        value = agreed(value)
    return Html(html.escape(str(value), quote=True))


def tag(name: str, content: object, cls: str | None = None, title: object = None) -> Html:
    attrs = f' class="{esc(cls)}"' if cls else ""
    if title is not None:
        attrs += f' title="{esc(title)}"'
    return Html(f"<{name}{attrs}>{esc(content)}</{name}>")


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def table(head: Iterable[str], rows: Iterable[Iterable[object]], empty: str = "none") -> Html:
    rows = list(rows)
    if not rows:
        return tag("p", empty, "muted")
    header = join(tag("th", h) for h in head)
    body = join(Html(f"<tr>{join(tag('td', c) for c in row)}</tr>") for row in rows)
    return Html(f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>')


def section(title: str, *content: object, anchor: str) -> Html:
    return Html(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{join(content)}</section>')


def badge(text: str, level: str) -> Html:
    """level: ok, warn, bad, muted."""
    return tag("span", text, f"badge {level}")


def facts(pairs: Iterable[tuple[str, object]]) -> Html:
    items = join(Html("<div>" + tag("dt", k) + tag("dd", v) + "</div>") for k, v in pairs)
    return Html(f"<dl>{items}</dl>")


def shown(text: object) -> str | None:
    """A cause or an error, cut; the workers' different ones (merge.py lists them) one after another."""
    if isinstance(text, list):
        text = "; ".join(map(str, text))
    return None if text is None else capped(str(text))[:SHOWN_CHARS + 40]


def agreed(value: Any) -> Any:
    """A value the workers should agree on (a generation, a strategy): merge.py lists them when
    they do not, and the page says so rather than showing one."""
    if isinstance(value, list):
        return " or ".join(map(str, value)) + " (the workers differ)"
    return value


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def secs(value: object) -> str | None:
    return None if not isinstance(value, (int, float)) else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def pct(value: object) -> str | None:
    return None if not isinstance(value, (int, float)) else f"{value * 100:.1f} %"


CSS = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#fff;--muted:#667;--line:#d8dde3;--head:#f3f5f7;
--ok:#1a7f37;--okbg:#dafbe1;--warn:#9a6700;--warnbg:#fff8c5;--bad:#b42318;--badbg:#ffebe9}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#8b949e;--line:#30363d;
--head:#161b22;--okbg:#12361f;--ok:#56d364;--warnbg:#3b2e00;--warn:#e3b341;--badbg:#490202;--bad:#ff7b72}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,main{max-width:1400px;margin:0 auto;padding:0 12px}
h1{font-size:20px;margin:12px 0 0}h2{font-size:16px;margin:20px 0 6px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:12px 0 4px}
p{margin:4px 0}.muted{color:var(--muted)}a{color:inherit}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--head);white-space:nowrap;font-weight:600}
td{white-space:nowrap}
.cause,.why{display:block;white-space:normal;word-break:break-word;min-width:14em;max-width:44em}
.cause{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.why{font-size:12px;color:var(--muted);max-width:24em;margin-top:2px}
code{font-size:12px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-weight:600;white-space:nowrap}
.ok{color:var(--ok);background:var(--okbg)}.warn{color:var(--warn);background:var(--warnbg)}
.bad{color:var(--bad);background:var(--badbg)}.badge.muted{background:var(--head)}
dl{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:2px 16px;margin:0}
dl div{display:flex;gap:8px;border-bottom:1px solid var(--line);padding:3px 0}
dt{color:var(--muted);min-width:11em}dd{margin:0;word-break:break-word}
dd .badge{white-space:normal}
@media (max-width:600px){body{font-size:15px}dt{min-width:9em}}
"""
