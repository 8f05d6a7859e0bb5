"""The HTML report in a real browser: built from a real MLflow store (fedeq, fedavg, fedrep, seeds 0
and 1: the `report_store` fixture), opened from disk in headless Chromium (Debian's `chromium`, driven
by Playwright's Python API; never a browser Playwright downloads). It must draw every figure and
table with no console error, no page error and no request but the file itself, and look like
something (a screenshot with many colours).

Skipped without /usr/bin/chromium or playwright, except under CI (the CI variable set), where .ci/run
installs both and their absence is a failure."""
import io
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FIGURES = ("acc_vs_total_mb", "acc_vs_memory", "acc_vs_flops", "acc_vs_round", "acc_vs_mb", "acc_vs_sim_time",
           "peak_memory", "client_acc", "deq_steps", "deq_residual")
METHODS = ("fedeq", "fedavg", "fedrep")


def need_browser():
    try:
        import playwright.sync_api  # noqa: F401
        reason = None if os.path.exists(CHROMIUM) else f"no system Chromium at {CHROMIUM} (apt-get install chromium)"
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs it, so under CI this is a failure")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def report_dir(report_store, tmp_path_factory):
    from bench.report import build

    out = tmp_path_factory.mktemp("report")
    build(report_store["uri"], report_store["experiment"], out=str(out))
    return out


@contextmanager
def opened(index: Path):
    """(page, errors, requests): `index` loaded from disk in headless system Chromium, with every
    console error, page error (uncaught exception) and request the page makes recorded."""
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "assert") else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(index.as_uri(), wait_until="load")
            yield page, errors, requests
        finally:
            browser.close()


def test_html_report_opens_offline_in_chromium_and_draws_every_figure_and_table(report_dir, tmp_path):
    need_browser()
    from PIL import Image, ImageStat

    index = Path(report_dir) / "index.html"
    url = index.as_uri()
    with opened(index) as (page, errors, requests):
        plots = page.locator("div.plot")
        n_plots = plots.count()
        # Plotly draws each figure into an <svg class="main-svg"> inside its div, a g.trace per trace.
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('div.plot')).every("
            "d => d.querySelector('.main-svg') && d.querySelector('g.trace'))", timeout=30_000)
        ids = plots.evaluate_all("ds => ds.map(d => d.id)")
        tables = page.evaluate(
            "() => Array.from(document.querySelectorAll('table.sortable')).map(t => ({"
            "caption: t.caption ? t.caption.textContent : '', rows: t.tBodies[0].rows.length,"
            "text: t.textContent}))")
        # Sorting: a header clicked twice gives the rows in the opposite order.
        first = page.locator("table.sortable").first
        col = ("Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
               ".map(r => r.cells[0].textContent)")
        first.locator("th").first.click()
        once = page.evaluate(col)
        first.locator("th").first.click()
        twice = page.evaluate(col)
        shot = page.screenshot(full_page=False)
        figure_shot = page.locator(f"#{ids[3]}").screenshot()  # the accuracy-vs-MB figure
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)  # for a look after a failure

    assert errors == []
    assert set(requests) == {url}, f"requests besides the page: {sorted(set(requests) - {url})}"
    # One section (synthetic), every figure of it (fedeq logs deq/*, clients.csv has unseen clients).
    assert n_plots == len(FIGURES) and sorted(ids) == sorted(f"s0-{f}" for f in FIGURES)
    assert tables and all(t["rows"] > 0 and t["caption"] for t in tables)
    assert all(m in tables[0]["text"] for m in METHODS)  # the first table: one row per method
    assert twice == once[::-1] and len(once) > 1
    for png, min_colours in ((shot, 64), (figure_shot, 16)):
        img = Image.open(io.BytesIO(png)).convert("RGB")
        colours = img.getcolors(maxcolors=1 << 20)
        assert len(colours) > min_colours
        assert max(ImageStat.Stat(img).stddev) > 10  # not one flat colour


WIDER = """() => {
  const w = window.innerWidth, out = [];
  for (const el of document.querySelectorAll("body *")) {
    const r = el.getBoundingClientRect();
    const name = `${el.tagName}.${el.getAttribute("class")}`;
    // Right of the viewport (plotly parks a text-measuring <svg> far left, at -10000 px: never seen).
    if (r.width && r.right > w + 0.5) out.push(`${name} ${r.left}..${r.right}`);
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== "visible")
      out.push(`${name} scrolls: ${el.scrollWidth} > ${el.clientWidth}`);
  }
  const doc = document.documentElement;
  if (doc.scrollWidth > w) out.push(`page scrolls: ${doc.scrollWidth} > ${w}`);
  return out;
}"""
"""Every element that sticks out of the viewport, scrolls sideways, or makes the page scroll sideways."""


def test_the_report_fits_a_1280_px_page_with_no_horizontal_scroll(report_dir):
    """At 1280 px (the viewport `opened` uses) every table, note and figure fits: no element is wider
    than the viewport or scrolls sideways (the table of 17 columns that was split did). The check
    itself fails on a page with one table too wide, so it can."""
    need_browser()
    with opened(Path(report_dir) / "index.html") as (page, errors, _):
        assert page.viewport_size["width"] == 1280
        page.wait_for_function("() => Array.from(document.querySelectorAll('div.plot')).every("
                               "d => d.querySelector('.main-svg'))", timeout=30_000)
        page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")  # the configs too
        too_wide = page.evaluate(WIDER)
        assert too_wide == [] and errors == []
        # The same check on the page with a table of 40 wide columns added: it is caught.
        page.evaluate("""() => { const div = document.createElement("div"); div.className = "wide";
          div.innerHTML = "<table><tr>" + "<td class='num'>0.8846 ± 0.0123</td>".repeat(40) + "</tr></table>";
          document.body.appendChild(div); }""")
        assert page.evaluate(WIDER)


def test_the_browser_check_sees_a_request_and_an_error(tmp_path):
    """The checks above can fail: a page that fetches an image and throws is caught on both counts."""
    need_browser()
    index = tmp_path / "index.html"
    index.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                     "<script>undefined_function()</script></body></html>")
    with opened(index) as (page, errors, requests):
        page.wait_for_load_state("networkidle")
    assert "http://127.0.0.1:9/x.png" in requests
    assert any("undefined_function" in e for e in errors)


def test_html_report_is_one_file_that_names_no_host(report_dir):
    # No browser needed: besides plotly.js (whose code holds URL strings, of map tiles and licences,
    # that the browser test shows are never requested) the page names no URL at all.
    from bench.report.html import plotly_js

    page = (Path(report_dir) / "index.html").read_text()
    bundle = plotly_js()
    assert page.count(bundle) == 1
    ours = page.replace(bundle, "")
    assert "http://" not in ours and "https://" not in ours and "<link" not in ours
    assert sorted(p.name for p in Path(report_dir).iterdir() if p.name.endswith(".html")) == ["index.html"]
