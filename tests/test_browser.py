"""End to end in a real browser: headless Chromium (Debian's) uploads a slice and reads the result.

`make test` installs chromium and chromium-driver from Debian when they are missing. The
screenshot is kept as artifacts/service_e2e.png.
"""

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from PIL import Image

from ichedge.evaluate import evaluate_model
from ichedge.runs import RunFolder
from ichedge.service import create_app
from tests.conftest import synthetic_slice

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_run):
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(served_run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed: run `make browser` (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def test_upload_a_slice_and_read_the_result_from_the_page(server, browser, tmp_path):
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "slice_0007.png"
    Image.fromarray(synthetic_slice(np.random.default_rng(7), True)).save(image)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "id " in b.find_element(By.ID, "model-info").text)  # the model info loaded
    browser.find_element(By.ID, "files").send_keys(str(image))
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card")))
    probability = float(card.find_element(By.CLASS_NAME, "probability").text.split()[-1])
    decision = card.find_element(By.CLASS_NAME, "decision").text
    assert 0.0 <= probability <= 1.0
    assert decision in ("hemorrhage suspected", "no hemorrhage flagged")
    assert card.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/png;base64,")
    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    assert len(rows) == 1 and "slice_0007.png" in rows[0].text
    import httpx

    credit = httpx.get(server + "/api/credit").json()["data"]
    assert browser.find_element(By.ID, "credit").text == "Data credit: " + credit
    # the page shows what the API says for the same file

    with image.open("rb") as fh:
        api = httpx.post(server + "/api/predict?heatmap=false", files={"files": (image.name, fh)}).json()
    assert probability == pytest.approx(api["results"][0]["probability"], abs=5e-4)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "service_e2e.png"))
    assert (ARTIFACTS / "service_e2e.png").stat().st_size > 10_000


def test_reports_render_offline_in_chromium(served_run, tiny_export, browser, tmp_path):
    """A training report and an evaluation report open from disk with every plot drawn."""
    from selenium.webdriver.common.by import By

    data = RunFolder.open(served_run).meta["dataset"]["source"]
    model = tiny_export.files["int8"]
    folder, _ = evaluate_model(model, data, tmp_path, n_boot=200, unseen_only=True)
    for name, page in (("report_run", served_run / "report.html"), ("report_evaluation", folder / "report.html")):
        browser.get(page.resolve().as_uri())
        assert browser.find_element(By.TAG_NAME, "h1").text
        assert browser.find_elements(By.CSS_SELECTOR, "table tbody tr")
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 3
        assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", im)
                   for im in images), "every embedded plot decodes"
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
