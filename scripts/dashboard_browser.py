#!/usr/bin/env python
"""Keep the live page of a running `dsla serve` open in headless chromium; optionally force plan
changes on the way and save a screenshot.

    python scripts/dashboard_browser.py --url http://127.0.0.1:8000 --seconds 120 \
        --force 25:0.5 --force 60:0.1 --screenshot-at 100 --out docs/results/dashboard.png

``--force T:R`` posts {"ratio": R} to /v1/dsla/plan T seconds after the page opened (a forced
change, marked "api" on the page). With only ``--seconds`` it just keeps the page open (the
"page open" side of docs/results/dashboard.md). Needs chromium + chromedriver (`make chromium`).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import httpx

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seconds", type=float, default=60, help="how long the page stays open")
    p.add_argument("--force", action="append", default=[], help="T:RATIO, seconds after opening (repeatable)")
    p.add_argument("--screenshot-at", type=float, default=None, help="seconds after opening")
    p.add_argument("--out", default="dashboard.png")
    p.add_argument("--size", default="1400,1500", help="window width,height in pixels")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    forces = sorted((float(t), float(r)) for t, r in (f.split(":") for f in args.force))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    opts = webdriver.ChromeOptions()
    opts.binary_location = args.chromium
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=opts, service=Service(args.chromedriver))
        try:
            driver.get(args.url.rstrip("/") + "/dashboard")
            if args.api_key:
                time.sleep(2)
                driver.find_element("id", "key").send_keys(args.api_key)
                driver.find_element("id", "key-submit").click()
            t0 = time.monotonic()
            shot = args.screenshot_at
            while (now := time.monotonic() - t0) < args.seconds:
                if forces and now >= forces[0][0]:
                    _, ratio = forces.pop(0)
                    r = httpx.post(args.url.rstrip("/") + "/v1/dsla/plan", headers=headers, timeout=120,
                                   json={"ratio": ratio, "reason": "dashboard_browser.py"})
                    print(f"{now:6.1f} s: forced ratio {ratio}: HTTP {r.status_code}", flush=True)
                if shot is not None and now >= shot:
                    driver.save_screenshot(args.out)
                    print(f"{now:6.1f} s: screenshot {args.out}", flush=True)
                    shot = None
                time.sleep(0.2)
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            print(f"console errors: {len(errors)}", *errors, sep="\n")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
