"""End to end in a real browser: headless Chromium (Debian's) reads a study, gives feedback, opens the monitor.

`make test` installs chromium and chromium-driver from Debian when they are missing. The
screenshot is kept as artifacts/service_e2e.png.
"""

import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from selenium.webdriver.common.action_chains import ActionChains

from ichedge.evaluate import evaluate_model
from ichedge.monitoring import monitor
from ichedge.runs import RunFolder
from ichedge.service import create_app
from ichedge.store import Store
from tests.conftest import ct_phantom, write_ct_dicom

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):
    """The service on a free port, recording in a SQLite store (``server.store``)."""
    port = free_port()
    store = Store(tmp_path_factory.mktemp("store") / "ichedge.db")
    app = create_app(served_run, store=store, keep_uploads=tmp_path_factory.mktemp("uploads"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the service did not start"
        time.sleep(0.05)
    yield Served(f"http://127.0.0.1:{port}", store)
    srv.should_exit = True
    thread.join(10)


@dataclass
class Served:
    url: str
    store: Store


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


def test_read_a_study_give_feedback_and_see_it_in_the_monitor(server, browser, tmp_path):
    """Upload a DICOM series, scroll it, switch windows, confirm the study, mark a bleed, open the monitor."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    rng = np.random.default_rng(7)
    files = [write_ct_dicom(tmp_path / f"s{k}.dcm", ct_phantom(rng, k == 2), z=5.0 * k, instance=k) for k in (1, 2, 3)]
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "id " in b.find_element(By.ID, "model-info").text)  # the model info loaded
    browser.find_element(By.ID, "files").send_keys("\n".join(map(str, files)))
    counter = wait.until(ec.visibility_of_element_located((By.ID, "slice-counter")))
    wait.until(lambda b: counter.text.endswith("/ 3"))
    bars = browser.find_elements(By.CSS_SELECTOR, "#score-strip > *")
    assert [b.get_attribute("data-index") for b in bars] == ["0", "1", "2"]
    assert {b.get_attribute("data-preset") for b in browser.find_elements(By.CSS_SELECTOR, "#presets button")} == {
        "brain", "subdural", "bone"}  # DICOM: every window preset
    image = browser.find_element(By.ID, "slice-image")
    brain = image.get_attribute("src")
    assert brain.startswith("data:image/png;base64,")
    browser.find_element(By.CSS_SELECTOR, "#presets [data-preset=bone]").click()
    assert image.get_attribute("src") != brain
    browser.find_element(By.ID, "viewer").send_keys(Keys.HOME)
    wait.until(lambda b: counter.text.startswith("slice 1 /"))
    browser.find_element(By.ID, "viewer").send_keys(Keys.ARROW_DOWN)
    wait.until(lambda b: counter.text.startswith("slice 2 /"))  # the bleeding slice, in series order

    browser.find_element(By.ID, "study-confirm").click()
    wait.until(lambda b: "recorded" in b.find_element(By.ID, "feedback-status").text)
    browser.find_element(By.ID, "mark-bleed").click()
    browser.find_element(By.CSS_SELECTOR, "#subtype option[value=IPH]").click()
    ActionChains(browser).move_to_element_with_offset(image, 10, -20).click().perform()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history .feedback-entry")) == 2)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history .prediction-entry")) == 1

    notes = server.store.table("feedback")
    (study,) = server.store.table("predictions")
    assert [n["slice_hash"] is None for n in notes] == [True, False]
    assert notes[0]["verdict"] == "confirm" and notes[0]["hemorrhage"] == study["flagged"]
    slice_two = [s for s in server.store.table("slices") if s["position"] == 1][0]
    assert notes[1]["slice_hash"] == slice_two["slice_hash"] and notes[1]["hemorrhage"] and notes[1]["subtype"] == "IPH"
    assert 0.5 < notes[1]["x"] < 0.6 and 0.35 < notes[1]["y"] < 0.5  # where the click landed, as fractions
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "service_e2e.png"))
    assert (ARTIFACTS / "service_e2e.png").stat().st_size > 10_000

    browser.find_element(By.ID, "monitor-link").click()
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#monitor-table tbody tr")))
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    report = monitor(server.store)
    week = report["weeks"][0]
    assert cells[0] == week["week"] and cells[3] == "3" and week["slices"] == 3 and week["feedback"] == 1
    assert week["agreement"] == 1.0 and "100" in " ".join(cells)
    browser.save_screenshot(str(ARTIFACTS / "monitor_e2e.png"))


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
