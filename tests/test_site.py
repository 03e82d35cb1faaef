"""The built site in a real browser: every chapter page in headless Chromium.

Needs `make html` first (`make test` does it). Chromium comes from Debian
(`make system-deps`); without it the test skips, except in CI (CI=true), where it
must run.
"""

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import nbformat
import pytest

SITE = Path(__file__).resolve().parents[1] / "_build" / "html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SLUGS = sorted(p.name for p in (SITE.parents[1] / "solutions").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def site_url():
    if not (SITE / "index.html").is_file():
        pytest.fail(f"{SITE} is missing: build the site first with `make html`.")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is required in CI: `make system-deps` installs Debian's chromium.")
        pytest.skip("Chromium not found (install Debian's chromium, or run `make system-deps` as root).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module", params=SLUGS)
def chapter(request, site_url, browser):
    """A loaded chapter page and every URL it requested."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # a common laptop width
    page.slug = request.param
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{site_url}/book/{request.param}.html", wait_until="networkidle")
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    page.evaluate("() => MathJax.startup.promise")
    yield page, requests
    page.close()


def test_no_request_leaves_localhost(chapter, site_url):
    _, requests = chapter
    assert requests, "the page made no requests at all"
    outside = [url for url in requests if not url.startswith(site_url) and not url.startswith("data:")]
    assert outside == [], f"requests left 127.0.0.1: {outside}"


def test_math_is_rendered_by_local_mathjax(chapter, site_url):
    page, requests = chapter
    assert any(url.startswith(f"{site_url}/_static/mathjax/") for url in requests)
    assert page.locator("mjx-container").count() >= 10
    assert page.locator("mjx-merror").count() == 0, "MathJax reported a TeX error"
    # no raw TeX left where math should be: display math sits inside mjx-container
    assert "\\frac" not in page.locator("article").inner_text()


def test_every_image_has_loaded(chapter):
    page, _ = chapter
    images = page.eval_on_selector_all(
        "article img", "imgs => imgs.map(i => [i.src, i.complete && i.naturalWidth > 0])")
    assert len(images) >= 3, f"expected the chapter's figures, found {images}"
    assert all(ok for _, ok in images), [src for src, ok in images if not ok]


def test_download_link_returns_the_released_notebook(chapter):
    page, _ = chapter
    link = page.locator("a.download", has_text=f"{page.slug}.ipynb")
    assert link.count() == 1
    response = page.request.get(link.evaluate("a => a.href"))
    assert response.ok
    nb = nbformat.reads(response.text(), as_version=4)
    nbformat.validate(nb)
    source = "\n".join(cell.source for cell in nb.cells)
    assert "raise NotImplementedError()" in source and "BEGIN SOLUTION" not in source
    assert "HIDDEN TESTS" not in source and "hidden=True" not in source


def test_launch_buttons_are_offered(chapter):
    page, _ = chapter
    box = page.locator(".exercise-links")
    hrefs = box.locator("a.launch-link").evaluate_all("links => links.map(a => a.href)")
    assert [h.split("/")[2] for h in hrefs][:2] == ["colab.research.google.com", "mybinder.org"]
    assert all(f"exercises/{page.slug}/{page.slug}.ipynb" in h for h in hrefs)
    assert len(hrefs) == 3
    header = page.locator(".dropdown-launch-buttons a").evaluate_all("links => links.map(a => a.href)")
    assert sorted(header) == sorted(hrefs), "the page's launch buttons must open the exercise too"


#: A figure shown at less than this fraction of its own width has unreadable text: matplotlib's
#: 10 pt at 100 dpi is 14 px in the image, and under 10 px on the page below 0.7.
MIN_SCALE = 0.7


def test_figures_are_shown_large_enough_to_read(chapter):
    """At 1280 px the content column is about 690 px wide: a figure drawn much wider is
    shrunk until its legend and labels cannot be read."""
    page, _ = chapter
    sizes = page.eval_on_selector_all(".cell_output img", "imgs => imgs.map(i => [i.naturalWidth, i.clientWidth])")
    shrunk = [f"figure {i + 1}: {natural} px shown at {shown} px" for i, (natural, shown) in enumerate(sizes)
              if natural and shown / natural < MIN_SCALE]
    assert not shrunk, f"draw these narrower (or stack their panels): {shrunk}"


def test_no_output_is_wider_than_the_page(chapter):
    """A printed table wider than the column is clipped where the prose quotes it."""
    page, _ = chapter
    wide = page.eval_on_selector_all(".cell_output pre, .cell_output table",
                                     "els => els.filter(e => e.scrollWidth > e.clientWidth + 1)"
                                     ".map(e => e.textContent.trim().slice(0, 70))")
    assert not wide, f"outputs wider than the page (print fewer or narrower columns): {wide}"


def test_the_learner_package_is_linked_from_the_exercise_box(chapter):
    page, _ = chapter
    from bncourse.release import wheel_name

    link = page.locator(".exercise-links a", has_text=wheel_name())
    assert link.count() == 1
    response = page.request.get(link.evaluate("a => a.href"))
    assert response.ok and response.body()[:2] == b"PK"
