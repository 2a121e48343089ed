"""Headless Chromium with the network off, and what a page rendered: the vega views inside each
element (for tests/test_offline_plots.py and the study report's page in tests/test_study_e2e.py)."""
from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, which scripts/setup.sh installs


def _network_namespace_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def offline_prefix() -> list[str]:
    """``unshare -n`` where we may create namespaces (root): the browser then has only a loopback
    interface that is down, so no request can leave, whatever the page asks for."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: these tests need Debian's chromium package "
                    "(scripts/setup.sh installs it: apt-get install -y --no-install-recommends chromium)")
    return ["unshare", "-n"] if _network_namespace_works() else []


def rendered(page: Path, prefix: list[str], tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM of ``page`` after its scripts ran, from headless Chromium with the network off, and
    the page's console messages (Content-Security-Policy violations among them)."""
    profile = tmp_path / f"chromium-profile-{page.stem}"
    cmd = [*prefix, str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}",
           # without a namespace (not root) these stop any name lookup and any connection instead
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
           "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and "</html>" in proc.stdout, (
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE:" in line]


def rendered_dom(page: Path, prefix: list[str], tmp_path: Path) -> str:
    return rendered(page, prefix, tmp_path)[0]


class _Charts(HTMLParser):
    """For each element id: how many vega views (``<canvas class="marks">`` or ``<svg class="marks">``,
    which vega's renderers create) lie inside it, and the rendered mark groups' ``<path>`` counts."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None, str]] = []  # (tag, id, class)
        self.views: dict[str, int] = {}
        self.paths: dict[str, int] = {}  # mark type ("mark-rect") -> paths in its groups
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag in ("canvas", "svg") and "marks" in classes:
            for _, element_id, _ in self.stack:
                if element_id:
                    self.views[element_id] = self.views.get(element_id, 0) + 1
        if tag == "path" and self.stack and self.stack[-1][0] == "g" and "role-mark" in self.stack[-1][2].split():
            group = self.stack[-1][2].split()[0]  # mark-rect, mark-line, mark-symbol, ...
            self.paths[group] = self.paths.get(group, 0) + 1
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag not in self.VOID:
            self.stack.append((tag, a.get("id"), a.get("class") or ""))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return


def charts(dom: str) -> _Charts:
    parser = _Charts()
    parser.feed(dom)
    parser.close()
    return parser


def embed_targets(page_source: str) -> list[str]:
    """The element ids the page hands to vegaEmbed (DVC: ``vegaEmbed('#id', spec)``)."""
    return re.findall(r"""vegaEmbed\(\s*["']#([^"']+)["']""", page_source)
