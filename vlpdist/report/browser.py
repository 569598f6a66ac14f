"""The report in a real browser: Debian's headless Chromium through its chromedriver (selenium), for
`launcher.report --screenshot` and the browser test. Both are optional: without them a one-line
`UserError` says what to install."""

from __future__ import annotations

import shutil
from pathlib import Path

from vlpdist.errors import UserError

WINDOW_WIDTH = 1200  # CSS px: the page's body is at most 1200 px wide
WINDOW_HEIGHT = 1000
# Chromium cannot capture a surface taller than its texture limit (16384 px); a longer page is cut there.
MAX_SCREENSHOT_HEIGHT = 16384
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium chromium-driver"


def require_chromium() -> None:
    """A `UserError` naming what is missing when chromium, chromedriver or selenium is not installed."""
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not installed: the screenshot needs headless Chromium ({INSTALL_HINT})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise UserError("selenium is not installed: the screenshot drives Chromium through it (pip install selenium, "
                        "or the test extra)") from None


def headless_chromium():
    """A selenium driver of headless Chromium, its console log kept (`driver.get_log("browser")`); quit() it."""
    require_chromium()
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}",
                     "--disable-dev-shm-usage", "--hide-scrollbars"):  # a screenshot of the page, not of a scrollbar
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    except WebDriverException as err:
        first_line = (err.msg or str(err)).strip().splitlines()[0] if (err.msg or str(err)).strip() else type(err).__name__
        raise UserError(f"headless Chromium did not start: {first_line}") from None


def capture_page_png(driver, height: int | None = None) -> bytes:
    """The loaded page as PNG, WINDOW_WIDTH wide, from the top down to `height` CSS px (None: the whole
    page, up to MAX_SCREENSHOT_HEIGHT). The viewport is resized through the DevTools protocol, so the
    image is exactly the page's pixels, not the window's."""
    page_height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    rows = max(1, min(page_height if height is None else min(height, page_height), MAX_SCREENSHOT_HEIGHT))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WINDOW_WIDTH, "height": rows, "deviceScaleFactor": 1, "mobile": False})
    return driver.get_screenshot_as_png()


def save_screenshot(page: Path, png: Path, height: int | None = None) -> Path:
    """Open the HTML file `page` in headless Chromium and write its screenshot to `png` (atomically)."""
    from vlpdist.atomic import atomic_write_bytes

    driver = headless_chromium()
    try:
        driver.get(Path(page).resolve().as_uri())
        data = capture_page_png(driver, height)
    finally:
        driver.quit()
    return atomic_write_bytes(Path(png), data)
