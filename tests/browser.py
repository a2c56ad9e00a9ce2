"""A page opened in the system's headless Chromium (Debian's `chromium`, which `.ci/run` installs),
driven by Playwright without its own browser download: what a user's browser would complain of.
No browser found is a failure, not a skip: the page is only checked where a browser loads it."""
from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no Chromium on PATH: install Debian's chromium package (.ci/run does)"
    return path


def open_page(path: Path, screenshot: Path | None = None, width: int = 1300) -> dict:
    """Load `path` as file://; {"problems": console errors/warnings, page errors, failed loads and any
    request that is not the file itself or inline data, "images": how many <img> decoded, "broken": how
    many did not, "text": the page's visible text}."""
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed load: {r.url[:80]}"))
            url = path.resolve().as_uri()
            page.on("request", lambda r: None if r.url == url or r.url.startswith("data:")
                    else problems.append(f"request outside the file: {r.url[:80]}"))
            page.goto(url, wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
            text = page.inner_text("body")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"problems": problems, "images": sum(images), "broken": len(images) - sum(images), "text": text}
