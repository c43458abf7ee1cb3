"""The live page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium).

`make setup` installs chromium and chromedriver when they are missing (scripts/install_chromium.sh);
deselect with ``-m "not browser"`` where no browser can be installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import make_engine, serve_in_thread

pytestmark = pytest.mark.browser
MODEL = "tiny"
CHROMIUM = os.environ.get("DSLA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DSLA_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1400"]  # small /dev/shm in containers
WAIT_S = 10  # "within a few seconds": the page polls once a second


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{missing} not found: run `make setup` (installs Debian's chromium and chromium-driver), "
                    "or deselect with -m 'not browser'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def serve(serve_dir, serve_tok):
    """Start a server on the tiny model (DSLA modules on layers 0 and 1 only); return its base URL."""
    from dsla.model.loading import load_teacher
    from dsla.serve.api import create_app
    from dsla.serve.dashboard import set_plan_control

    stops = []

    def start(api_key=None, plan_control=True):
        model = load_teacher(serve_dir)
        model.add_dsla((0, 1))
        engine = make_engine(model, serve_tok)
        app = create_app(engine, MODEL, api_key=api_key)
        set_plan_control(app, plan_control)
        url, stop = serve_in_thread(app)
        stops.append((engine, stop))
        return url

    yield start
    for engine, stop in stops:
        stop()
        engine.shutdown()


def wait(driver, cond, what):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: cond(d))
    except TimeoutException:
        raise AssertionError(f"the page did not show {what} within {WAIT_S} s") from None


# The page redraws every second, so each read is one script (no element outlives a redraw).
def strip(driver) -> dict[int, str]:
    """Layer -> "dsla" or "attention", as the layer strip shows it."""
    got = driver.execute_script(
        "return [...document.querySelectorAll('#layers .layer')].map(e => [e.dataset.layer, e.dataset.kind])")
    return {int(layer): kind for layer, kind in got}


def events(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#events li[data-source]')].map(e => ({source: e.dataset.source, "
        "converted: e.dataset.converted, reverted: e.dataset.reverted, text: e.textContent}))")


def ratio_chart(driver) -> tuple[float | None, int]:
    """The ratio chart's latest value and how many plan-change markers it draws."""
    last, markers = driver.execute_script(
        "const s = document.querySelector('svg[data-chart=\"ratio\"]');"
        "return s ? [s.dataset.last || null, s.querySelectorAll('line.marker').length] : [null, 0]")
    return (float(last) if last else None), markers


def text_of(driver, id_: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", id_)


def console_problems(driver, expected_network: list[tuple[str, int]]) -> list[dict]:
    """Console errors other than the failed requests the test caused on purpose (path, status)."""
    out = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        msg = entry["message"]
        if entry["source"] == "network" and any(p in msg and f"status of {s}" in msg for p, s in expected_network):
            continue
        out.append(entry)
    return out


def test_page_follows_forced_conversions_and_reverts(browser, serve):
    url = serve()
    browser.get(url + "/dashboard")
    wait(browser, lambda d: strip(d) == {0: "attention", 1: "attention", 2: "attention"}, "three attention layers")
    assert browser.execute_script("return document.querySelector('#layers .layer.next').dataset.layer") == "0"

    # A conversion forced through the API: the strip and the timeline show it.
    r = httpx.post(url + "/v1/dsla/plan", json={"ratio": 0.67, "reason": "browser test"})
    assert r.status_code == 200, r.text
    wait(browser, lambda d: strip(d) == {0: "dsla", 1: "dsla", 2: "attention"}, "layers 0 and 1 as DSLA")
    wait(browser, lambda d: any(e["source"] == "api" and e["converted"] == "0,1" and "browser test" in e["text"]
                                for e in events(d)), "the conversion in the plan changes")
    wait(browser, lambda d: ratio_chart(d)[1] >= 1 and abs((ratio_chart(d)[0] or 0) - 2 / 3) < 1e-6,
         "the conversion on the ratio timeline")
    assert browser.execute_script("return document.querySelector('#layers .layer.next')") is None  # 2: no weights

    # Revert with the page's own control; then the same checks the other way.
    browser.find_element("id", "revert-all").click()
    wait(browser, lambda d: strip(d) == {0: "attention", 1: "attention", 2: "attention"}, "the revert in the strip")
    wait(browser, lambda d: any(e["reverted"] == "0,1" and "live page" in e["text"] for e in events(d)),
         "the revert in the plan changes")
    wait(browser, lambda d: ratio_chart(d)[0] == 0 and ratio_chart(d)[1] >= 2, "the revert on the ratio timeline")
    assert "reverted [0, 1]" in text_of(browser, "control-result")

    # An impossible ratio: the API's error, word for word.
    field = browser.find_element("id", "ratio-input")
    field.clear()
    field.send_keys("1")
    browser.find_element("id", "apply-ratio").click()
    expected = httpx.post(url + "/v1/dsla/plan", json={"ratio": 1}).json()["error"]["message"]
    wait(browser, lambda d: expected in text_of(d, "control-result"), "the API's error verbatim")
    assert strip(browser)[0] == "attention"
    assert console_problems(browser, [("/v1/dsla/plan", 400)]) == []


def test_page_with_a_key_shows_nothing_until_it_is_entered_and_is_read_only(browser, serve):
    url = serve(api_key="sekret", plan_control=False)
    browser.get(url + "/dashboard")
    wait(browser, lambda d: d.find_element("id", "keygate").is_displayed(), "the key prompt")
    assert not browser.find_element("id", "main").is_displayed()
    assert not browser.find_elements("css selector", "#layers .layer")

    browser.find_element("id", "key").send_keys("wrong")
    browser.find_element("id", "key-submit").click()
    wait(browser, lambda d: "wrong API key" in text_of(d, "key-error"), "the refusal of a wrong key")
    assert not browser.find_element("id", "main").is_displayed()

    browser.find_element("id", "key").send_keys("sekret")
    browser.find_element("id", "key-submit").click()
    wait(browser, lambda d: strip(d) == {0: "attention", 1: "attention", 2: "attention"}, "the layers once keyed")
    assert browser.execute_script("return sessionStorage.getItem('dsla.apiKey')") == "sekret"
    assert browser.execute_script("return localStorage.length") == 0
    assert "Read-only" in text_of(browser, "control-note")
    assert browser.execute_script("return ['convert-next', 'revert-all', 'apply-ratio'].every("
                                  "id => document.getElementById(id).disabled)")
    r = httpx.post(url + "/v1/dsla/plan", json={"ratio": 0.34}, headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "plan_control_disabled"
    assert console_problems(browser, [("/v1/dsla/dashboard", 401)]) == []
