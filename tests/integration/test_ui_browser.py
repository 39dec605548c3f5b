"""The playground in a real browser: headless Chromium (the system's) drives the page on the real SmolLM2.

It loads the page, compares before any pack, makes the Eiffel Tower → Rome edit with the page's form (progress
bar, evaluation and all), compares again, opens the new pack's card and takes a screenshot (written to
``$EDITPACK_SCREENSHOT`` too when that is set: that is how ``docs/playground.png`` is made).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(smollm2, corpus, tmp_path):
    from editpack.ui import Playground
    from editpack.ui.app import create_app

    model, tokenizer = smollm2
    playground = Playground(model, tokenizer, tmp_path / "packs", corpus=corpus)
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(playground), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the playground server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", playground
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="needs Chromium and chromedriver from the system packages (apt-get install chromium "
                           "chromium-driver); scripts/install.sh installs them where it can")
def test_playground_edit_and_compare_in_headless_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, playground = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(url)
        find = lambda id_: driver.find_element(By.ID, id_)  # noqa: E731
        WebDriverWait(driver, 30).until(lambda d: "No packs yet" in find("packs").text)

        find("compare").click()
        WebDriverWait(driver, 120).until(lambda d: "no pack is switched on" in find("compare-status").text)
        assert "Paris" in find("base-output").text

        assert find("edit-subject").get_attribute("value") == "The Eiffel Tower"
        find("edit-target").clear()
        find("edit-target").send_keys("Rome")
        find("edit-run").click()
        WebDriverWait(driver, 30).until(lambda d: find("edit-progress").value_of_css_property("width") != "0px")
        WebDriverWait(driver, 600).until(lambda d: "done in" in find("edit-status").text
                                         or "error" in find("edit-status").get_attribute("class"))
        assert "is switched on" in find("edit-status").text, find("edit-status").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#packs .pack")
        assert len(rows) == 1 and rows[0].find_element(By.CLASS_NAME, "pack-toggle").is_selected()
        assert "unrelated answers changed" in rows[0].text  # the evaluation's verdict

        find("compare").click()
        WebDriverWait(driver, 120).until(lambda d: "packs on:" in find("compare-status").text)
        assert "Paris" in find("base-output").text
        assert "Rome" in find("edited-output").text

        rows[0].find_element(By.CLASS_NAME, "card-link").click()
        WebDriverWait(driver, 30).until(lambda d: "Eiffel" in find("card").text)
        header = driver.find_element(By.TAG_NAME, "header").text
        assert header.endswith("packs in packs/") and str(tmp_path) not in header  # no local path in a screenshot
        shot = tmp_path / "playground.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("EDITPACK_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["EDITPACK_SCREENSHOT"])
        assert len(list((playground.packs_dir).iterdir())) == 1
    finally:
        driver.quit()
