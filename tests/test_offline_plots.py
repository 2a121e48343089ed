"""Plots that render with the network off: `dvc plots show`/`diff` through the committed
`.dvc/offline_template.html`, and kdlib.vega_html.standalone_page, each opened in headless Chromium
in a network namespace with no interfaces up (`unshare -n`), its rendered DOM read back. The control:
dvc-render's stock template, which loads vega from jsdelivr, renders no chart there."""
from __future__ import annotations

import base64
import configparser
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from browser import charts, embed_targets, offline_prefix, rendered, rendered_dom  # noqa: F401 (a fixture)
from dvc_repo import dvc_env, run
from kdlib import vega_html
from kdlib.vega_html import Block, HtmlFragment, Image, VegaLiteChart, standalone_page

REPO = Path(__file__).resolve().parents[1]
# --- `dvc plots` in a small DVC project ---------------------------------------------------------

PLOTS_YAML = """plots:
  - Validation top-1:
      x: step
      y:
        val_top1.tsv: top1
  - Student confusion:
      template: confusion
      x: actual
      y:
        confusion.json: predicted
  - Accuracy vs latency:
      template: scatter
      x: latency_ms
      y:
        quantization.csv: top1
"""
N_PLOTS = 3  # the definitions above, one chart each


@pytest.fixture(scope="module")
def plots_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git + DVC project with this repository's committed ``.dvc`` files (config, offline template)
    and three small plot files, one per vega template the pipeline's dvc.yaml uses (linear, confusion,
    scatter); committed, then the TSV changed in the workspace for `dvc plots diff`."""
    work = tmp_path_factory.mktemp("plots_project")
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", ".dvc"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert ".dvc/config" in tracked and ".dvc/offline_template.html" in tracked, tracked
    for rel in tracked:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, work / rel)
    (work / "dvc.yaml").write_text(PLOTS_YAML)
    (work / "val_top1.tsv").write_text("step\ttop1\n0\t12.5\n1\t31.0\n2\t44.25\n")
    (work / "confusion.json").write_text(
        '[{"actual": "cat", "predicted": "cat"}, {"actual": "cat", "predicted": "dog"},'
        ' {"actual": "dog", "predicted": "dog"}]\n')
    (work / "quantization.csv").write_text("precision,latency_ms,top1\nfp32,4.1,71.2\nint8,1.9,70.4\n")
    env = dvc_env()
    run(["git", "init", "-q"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "plots fixture"], work, env)
    (work / "val_top1.tsv").write_text("step\ttop1\n0\t15.0\n1\t36.5\n2\t50.0\n")
    return work, env


def _assert_all_rendered(html_file: Path, prefix: list[str], tmp_path: Path) -> None:
    source = html_file.read_text(encoding="utf-8")
    targets = embed_targets(source)
    assert len(targets) == N_PLOTS, targets
    found = charts(rendered_dom(html_file, prefix, tmp_path))
    assert {t: found.views.get(t, 0) for t in targets} == {t: 1 for t in targets}, found.views


def test_committed_template_is_the_generated_one_and_config_names_it() -> None:
    committed = (REPO / ".dvc" / "offline_template.html").read_bytes()
    assert committed == vega_html.dvc_template().encode("utf-8"), (
        "regenerate it: python -m kdlib.vega_html --write-template .dvc/offline_template.html")
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert config["plots"]["html_template"] == "offline_template.html"  # relative to .dvc/
    assert "{plot_divs}" in committed.decode() and "{scripts}" not in committed.decode()


def test_dvc_plots_show_and_diff_render_offline(plots_project, offline_prefix, tmp_path) -> None:
    work, env = plots_project
    run(["dvc", "plots", "show", "-o", "show"], work, env)
    run(["dvc", "plots", "diff", "HEAD", "-o", "diff"], work, env)
    for name in ("show", "diff"):
        page = work / name / "index.html"
        source = page.read_text(encoding="utf-8")
        assert not re.search(r"<script[^>]*\ssrc\s*=", source), f"{page}: a <script src>"
        assert "cdn.jsdelivr.net" not in source
        _assert_all_rendered(page, offline_prefix, tmp_path)
    diff = (work / "diff" / "index.html").read_text(encoding="utf-8")
    assert '"rev": "HEAD"' in diff and '"rev": "workspace"' in diff  # both revisions are in the data


def test_stock_cdn_template_renders_nothing_offline(plots_project, offline_prefix, tmp_path) -> None:
    """The control: the same plots through dvc-render's default page, which takes vega from
    jsdelivr. With the network off it shows no chart, so the checks above can fail."""
    work = tmp_path / "stock"
    shutil.copytree(plots_project[0], work)
    env = plots_project[1]
    run(["dvc", "config", "--unset", "plots.html_template"], work, env)
    run(["dvc", "plots", "show", "-o", "show"], work, env)
    page = work / "show" / "index.html"
    source = page.read_text(encoding="utf-8")
    assert '<script src="https://cdn.jsdelivr.net/npm/vega@5.20.2"></script>' in source
    targets = embed_targets(source)
    assert len(targets) == N_PLOTS, targets
    found = charts(rendered_dom(page, offline_prefix, tmp_path))
    assert {t: found.views.get(t, 0) for t in targets} == {t: 0 for t in targets}, found.views


# --- kdlib.vega_html.standalone_page ------------------------------------------------------------

def _png() -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (6, 4), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'


def _report_blocks() -> list[Block]:
    bars = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "mark": "bar",
            "data": {"values": [{"model": "teacher", "top1": 81.5}, {"model": "baseline", "top1": 70.1},
                                {"model": "KD </script> student", "top1": 73.4}]},
            "encoding": {"x": {"field": "model", "type": "nominal"},
                         "y": {"field": "top1", "type": "quantitative"}}}
    line = {"mark": {"type": "line", "point": True},
            "data": {"values": [{"epoch": e, "loss": v} for e, v in enumerate([2.3, 1.1, 0.7, 0.5, 0.45])]},
            "encoding": {"x": {"field": "epoch", "type": "quantitative"},
                         "y": {"field": "loss", "type": "quantitative"}}}
    return [
        Block("Test top-1", VegaLiteChart(bars)),
        Block("Training loss", VegaLiteChart(line)),
        Block("Results", HtmlFragment("<table id='results'><tr><th>model</th><th>top-1</th></tr>"
                                      "<tr><td>teacher</td><td>81.5</td></tr></table>")),
        Block("Confusion (PNG)", Image(_png(), "image/png", alt="confusion")),
        Block("Schematic (SVG)", Image(SVG, "image/svg+xml")),
    ]


def test_standalone_page_renders_offline(offline_prefix, tmp_path) -> None:
    page = tmp_path / "report.html"
    page.write_text(standalone_page("LS-KD compatibility study <draft>", _report_blocks()), encoding="utf-8")
    source = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc\s*=", source)
    assert "<title>LS-KD compatibility study &lt;draft&gt;</title>" in source
    dom, console = rendered(page, offline_prefix, tmp_path)
    assert not [line for line in console if "Content Security Policy" in line], console
    found = charts(dom)
    assert found.views == {"chart-1": 1, "chart-2": 1}, found.views
    assert 'class="chart-error"' not in dom  # where vegaEmbed rejected a spec
    # the bars and the line's points are drawn from the data: 3 bars, 5 points, 1 line
    assert found.paths.get("mark-rect") == 3, found.paths
    assert found.paths.get("mark-symbol") == 5, found.paths
    assert found.paths.get("mark-line") == 1, found.paths
    assert "KD &lt;/script&gt; student" in dom or "KD </script> student" in dom  # the label survived
    assert "<table id=\"results\">" in dom
    png_uri = "data:image/png;base64," + base64.b64encode(_png()).decode()
    svg_uri = "data:image/svg+xml;base64," + base64.b64encode(SVG).decode()
    assert found.images == [png_uri, svg_uri]


def test_standalone_page_loads_nothing_from_elsewhere(offline_prefix, tmp_path) -> None:
    """Its Content-Security-Policy blocks what an HTML fragment would fetch, a local file included."""
    local = tmp_path / "figure.png"
    local.write_bytes(_png())
    page = tmp_path / "fetching.html"
    fragment = f'<img src="{local.as_uri()}"><img src="https://example.org/figure.png">'
    page.write_text(standalone_page("fetching", [Block("images", HtmlFragment(fragment))]), encoding="utf-8")
    _, console = rendered(page, offline_prefix, tmp_path)
    blocked = [line for line in console if "violates the following Content Security Policy" in line]
    assert len(blocked) == 2 and local.as_uri() in blocked[0] and "example.org" in blocked[1], console


def test_standalone_page_is_deterministic() -> None:
    blocks = _report_blocks()
    first = standalone_page("study", blocks)
    assert first == standalone_page("study", _report_blocks())
    spec = dict(blocks[0].content.spec)  # type: ignore[union-attr]
    reordered = Block(blocks[0].heading, VegaLiteChart(dict(reversed(list(spec.items())))))
    assert standalone_page("study", [reordered, *blocks[1:]]) == first  # sorted keys


def test_standalone_page_bad_input(tmp_path) -> None:
    nan = {"mark": "point", "data": {"values": [{"x": 1.0, "y": float("nan")}]}}
    with pytest.raises(ValueError, match=r"block 1 \('scores'\)\.data\.values\[0\]\.y: nan"):
        standalone_page("t", [Block("scores", VegaLiteChart(nan))])
    with pytest.raises(ValueError, match="data.url 'scores.csv'"):
        standalone_page("t", [Block("scores", VegaLiteChart({"mark": "point", "data": {"url": "scores.csv"}}))])
    (tmp_path / "figure.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match=r"figure.jpg: expected a .png or .svg image, got suffix '.jpg'"):
        Image.from_file(tmp_path / "figure.jpg")


def test_vendored_build_is_checked(monkeypatch, tmp_path) -> None:
    """A changed vendored file is refused, with the file and both hashes named."""
    for script in vega_html.SCRIPTS:
        shutil.copy2(vega_html.VENDOR_DIR / script.filename, tmp_path / script.filename)
        shutil.copy2(vega_html.VENDOR_DIR / script.license_file, tmp_path / script.license_file)
    with (tmp_path / "vega-lite.min.js").open("a") as f:
        f.write("\n")
    monkeypatch.setattr(vega_html, "VENDOR_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"vega-lite.min.js: sha256 [0-9a-f]{64}, expected d73157451b39"):
        vega_html.dvc_template()
