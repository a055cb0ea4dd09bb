"""report.html in a real browser: headless Chromium (Debian's, driven by Playwright) opens the file from disk,
with no network, and the page must run without a console error, draw one point per row in each plot's
SVG (and a ring over each point of its Pareto front), and sort its table on a click. Skipped only where Chromium is absent (.ci/run installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vitcompress.report import read_results, write_report
from vitcompress.search.pareto import mark_pareto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# As the machine's notes advise: no background networking (it is refused here, many times a second).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.mark.parametrize("study", ["quick", "fashion-mnist"])
def test_report_html_runs_offline_with_one_point_per_row(browser, tmp_path: Path, study: str) -> None:
    rows = mark_pareto(read_results(RESULTS / study / "results.jsonl"))
    write_report(tmp_path, rows, meta={"recipe": study, "dataset": "fashion-mnist"})
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((tmp_path / "report.html").as_uri())
    page.wait_for_selector("#plot-speed .scatterlayer .point", timeout=30_000)
    finished = [r for r in rows if r.get("status", "ok") == "ok"]
    for plot in ("plot-size", "plot-speed"):
        points = page.eval_on_selector_all(f"#{plot} .scatterlayer .trace .points path.point", "els => els.length")
        # One marker per row, plus a ring over each point of the plot's Pareto front (a trace of its own).
        per_trace = page.evaluate(f"() => document.getElementById('{plot}').data.map(t => [t.name, t.x.length])")
        rings = sum(n for name, n in per_trace if name == "Pareto front")
        assert sum(n for name, n in per_trace if name != "Pareto front") == len(finished), plot
        assert 1 <= rings < len(finished) and points == len(finished) + rings, (plot, points, rings)
    # The facts a reader needs to trust the numbers, as in report.md: the CPU and its instruction sets.
    assert "Hardware" in page.inner_text("ul.meta")
    assert not errors, errors
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests  # nothing fetched
    # Sorting: the accuracy column, descending after two clicks.
    header = page.locator("table.rows th", has_text="Accuracy (%)")
    header.click()
    header.click()
    column = [h.strip() for h in page.eval_on_selector_all("table.rows th", "els => els.map(e => e.textContent)")]
    values = page.eval_on_selector_all(
        f"table.rows tbody tr td:nth-child({column.index('Accuracy (%)') + 1})", "els => els.map(e => e.textContent)")
    numbers = [float(v) for v in values]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) == len(finished)
    # Hovering a point shows its row's name.
    point = page.locator("#plot-speed .scatterlayer .trace .points path.point").first
    point.scroll_into_view_if_needed()
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # plotly's drag layer is on top
    page.wait_for_selector("#plot-speed .hoverlayer .hovertext", timeout=5_000)
    hover = page.eval_on_selector("#plot-speed .hoverlayer", "e => e.textContent")
    assert any(r["name"] in hover for r in finished), hover
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 20_000
    page.close()
