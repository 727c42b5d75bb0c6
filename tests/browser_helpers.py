"""Drive the explorer page in headless Chromium (selenium + Debian's chromium-driver).

Used by ``tests/test_explorer_browser.py`` and ``scripts/explorer_screenshot.py``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> tuple[str, str] | str:
    """(browser, driver) paths, or the reason why they cannot be used."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return ("Chromium or chromedriver is not installed (Debian: apt-get install -y chromium "
                "chromium-driver); .ci/run installs them and CI runs these tests")
    return browser, driver


def start_chromium(browser: str, driver: str, width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value; its value."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"the page did not reach: {what} within {timeout:.0f} s")
        time.sleep(0.05)


def hybrids_version(drv: Any) -> int:
    return int(drv.execute_script("return +(document.body.dataset.hybridsVersion || 0)"))


def hybrid_sources(drv: Any) -> list[str]:
    return drv.execute_script(
        "return [...document.querySelectorAll('#row-hybrid img')].map(i => i.src)")


def selected_channels(drv: Any) -> list[int]:
    return drv.execute_script(
        "return [...document.querySelectorAll('.chip.selected')].map(c => +c.dataset.channel)")


def paint(drv: Any, region: np.ndarray) -> None:
    """Paint ``region`` ((H, W) bool at the maps' resolution) with one mouse stroke.

    The pointer visits the centre of each pixel of the region (row by row, alternating
    direction) with the mouse button held down, as a user's brush would.
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = drv.find_element(By.ID, "paint")
    rect = drv.execute_script("const r = arguments[0].getBoundingClientRect();"
                              "return [r.width, r.height];", canvas)
    h, w = region.shape
    sx, sy = rect[0] / w, rect[1] / h
    # a brush smaller than half a pixel paints exactly the pixels the pointer visits
    drv.execute_script("document.getElementById('brush').value = arguments[0];",
                       max(1, int(0.4 * min(sx, sy))))
    points = []
    for y in range(h):
        xs = np.flatnonzero(region[y])
        points += [(x, y) for x in (xs if y % 2 == 0 else xs[::-1])]
    # offsets from the element's centre (selenium 4)
    offs = [(int((x + 0.5) * sx - rect[0] / 2), int((y + 0.5) * sy - rect[1] / 2)) for x, y in points]
    chain = ActionChains(drv, duration=0).move_to_element_with_offset(canvas, *offs[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(offs, offs[1:]):
        chain = chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()
