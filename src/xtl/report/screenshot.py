"""A PNG of a report as headless Chromium renders it (the README's picture, the tests' artifact).

    python -m xtl.report.screenshot runs/quick/report/report.html docs/images/report.png

Needs Debian's `chromium` and the `playwright` package (the test extras); it never downloads a browser.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from xtl.errors import XtlError
from xtl.io import atomic_path

# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise XtlError("chromium is not installed (Debian: apt-get install chromium)")
    return path


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 1600, full_page: bool = False) -> Path:
    """Render `html` (a local file, nothing fetched) and save the top `height` pixels, or the full page."""
    from playwright.sync_api import sync_playwright

    if not html.is_file():
        raise XtlError(f"report {html} does not exist")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                       else route.abort())
            page.goto(html.resolve().as_uri(), wait_until="load")
            with atomic_path(png) as tmp:
                page.screenshot(path=str(tmp), full_page=full_page, type="png")
        finally:
            browser.close()
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--full-page", action="store_true")
    args = parser.parse_args()
    screenshot(args.html, args.png, args.width, args.height, args.full_page)
    print(args.png)


if __name__ == "__main__":
    main()
