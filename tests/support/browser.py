"""A real headless Chromium for browser tests, driven by selenium through Debian's own chromedriver.

`find_chromium()` returns the (browser, driver) paths or None (tests then skip, saying why). `start_chromium`
starts a fresh browser with a throwaway profile, no network of its own (no sync, no component updates, no
QUIC, no background networking) and the performance log on, so a test can read every request URL the page
made. selenium-manager is never asked for anything (SE_OFFLINE, and an explicit Service path).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not download anything

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
)


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed, else None."""
    browser = next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    driver = next((p for p in DRIVER_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def start_chromium(window: tuple[int, int] = (1400, 900)) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium (its own profile in a temporary directory), quit at the end."""
    found = find_chromium()
    if found is None:
        raise RuntimeError("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    browser, driver_path = found
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={window[0]},{window[1]}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(driver_path, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def network_requests(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Every request the page sent since the last call (from the performance log): url, method, headers."""
    found: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = driver.get_log("performance")  # type: ignore[no-untyped-call]
    for entry in entries:
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            request = message["params"]["request"]
            found.append({"url": request["url"], "method": request["method"], "headers": request.get("headers", {})})
        elif message.get("method") == "Network.requestWillBeSentExtraInfo":
            found.append({"url": "", "method": "", "headers": message["params"].get("headers", {})})
    return found


def save_screenshot(driver: webdriver.Remote, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
