"""A study's ``index.html``: its tables, claims and figures on one self-contained page
(:func:`kdlib.vega_html.standalone_page`: vendored vega / vega-lite / vega-embed inlined, PNGs as
``data:`` URIs), so it opens with no network."""
from __future__ import annotations

import base64
import html
from typing import Any, Sequence

from kdlib.vega_html import Block, HtmlFragment, Image, VegaLiteChart, standalone_page


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + rows + "</tbody></table>")


def _content(heading: str, kind: str, payload: Any) -> VegaLiteChart | HtmlFragment | Image:
    if kind == "table":
        return HtmlFragment(_table(*payload))
    if kind == "list":
        return HtmlFragment("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in payload) + "</ul>")
    if kind == "png":
        return Image(base64.b64decode(payload), "image/png", heading)
    if kind == "vega":
        return VegaLiteChart(payload)
    if kind == "text":
        return HtmlFragment(f"<pre>{html.escape(payload)}</pre>")
    raise ValueError(f"unknown block kind {kind!r}")


def study_page(title: str, text: str, blocks: Sequence[tuple[str, str, Any]]) -> str:
    """The page: ``blocks`` are (heading, kind, payload) with kind ``table`` ((head, body)),
    ``vega`` (a Vega-Lite spec), ``list`` (sentences), ``png`` (base64 bytes); ``text`` (table.md)
    closes the page."""
    return standalone_page(title, [Block(h, _content(h, k, p)) for h, k, p in [*blocks, ("table.md", "text", text)]])
