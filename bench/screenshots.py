"""Screenshots of the web page of a running server (headless chromium), for the docs.

    make demo    # leaves the server on http://127.0.0.1:8000
    .venv/bin/python bench/screenshots.py http://127.0.0.1:8000 docs/ --image data/world/images/008501.png
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def images_loaded(driver) -> bool:
    """Every result thumbnail has arrived (a screenshot before that shows empty boxes)."""
    from selenium.webdriver.common.by import By

    return all(i.get_property("naturalWidth") > 0 for i in driver.find_elements(By.CSS_SELECTOR, "#grid img"))


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("out", type=Path)
    p.add_argument("--query", default="a small red circle left of a big blue square")
    p.add_argument("--image", type=Path, required=True)
    a = p.parse_args()
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(a.url.rstrip("/") + "/")
        driver.find_element(By.ID, "q").send_keys(a.query)
        driver.find_element(By.ID, "go").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "results for"))
        wait.until(images_loaded)
        driver.save_screenshot(str(a.out / "web-text-search.png"))
        driver.find_element(By.ID, "file").send_keys(str(a.image.resolve()))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "images like"))
        wait.until(images_loaded)
        driver.save_screenshot(str(a.out / "web-image-search.png"))
        print(f"wrote {a.out / 'web-text-search.png'} and {a.out / 'web-image-search.png'}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
