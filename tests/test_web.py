"""The web demo (owl_jax/serve/web.py): the answer streams in pieces on the batcher, and in a real
browser (Debian's headless Chromium) a user uploads an image, asks, sees the streamed answer the API
gives, asks again with the history, and clears it; a screenshot is kept in test-artifacts/."""
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import QUESTIONS, REPO, free_port

ARTIFACTS = os.path.join(REPO, "test-artifacts")


def test_the_answer_streams_in_pieces_then_whole(owl):
    from owl_jax.inference.sampling import Sampling
    from owl_jax.serve.batcher import Batcher
    from owl_jax.serve.web import Conversation, answer_stream

    batcher = Batcher(owl, max_batch=2, max_new_tokens=24)
    try:
        shown = list(answer_stream(batcher, Conversation(), QUESTIONS[0], Sampling(), 24))
    finally:
        batcher.close()
    want = owl.chat(messages=QUESTIONS[0], max_new_tokens=24)
    assert shown[-1] == want and len(shown) >= 2, shown
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))  # each view extends the last


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    # The driver named: Selenium Manager would otherwise look for one to download.
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()


def test_chat_in_a_browser(owl, browser, tmp_path):
    import uvicorn
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from owl_jax.serve import web
    from owl_jax.serve.batcher import Batcher
    from owl_jax.serve.openai_api import create_app

    batcher = Batcher(owl, max_batch=4, max_new_tokens=24)
    server = uvicorn.Server(uvicorn.Config(web.mount(create_app(batcher), batcher), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    image = str(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    first = owl.chat(images=[image], messages=QUESTIONS[0], max_new_tokens=24)
    second = owl.chat(images=[image], max_new_tokens=24, messages=[
        {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": first},
        {"role": "user", "content": QUESTIONS[1]}])

    def wait(timeout: float):  # the page re-renders: an element found may be gone when it is read
        return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,))

    def bot_texts(d):
        return [e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, "#chat .bot")]

    def ask(question: str):
        box = browser.find_element(By.CSS_SELECTOR, "#ask textarea")
        box.send_keys(question)
        box.send_keys(Keys.ENTER)

    try:
        browser.get(f"http://127.0.0.1:{server.config.port}/")
        wait(60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask textarea"))
        browser.find_element(By.CSS_SELECTOR, "#ask input[type=file]").send_keys(image)
        wait(30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask img"))
        ask(QUESTIONS[0])
        wait(120).until(lambda d: bot_texts(d)[-1:] == [first.strip()])
        assert browser.find_elements(By.CSS_SELECTOR, "#chat .user img")  # the upload shows in the chat
        ask(QUESTIONS[1])  # the second turn sees the image and the first turn
        wait(120).until(lambda d: bot_texts(d)[-1:] == [second.strip()] and len(bot_texts(d)) == 2)
        os.makedirs(ARTIFACTS, exist_ok=True)
        assert browser.save_screenshot(os.path.join(ARTIFACTS, "web_demo.png"))
        browser.find_element(By.CSS_SELECTOR, "#clear").click()
        wait(30).until(lambda d: not bot_texts(d))
    finally:
        server.should_exit = True
        thread.join(30)
        batcher.close()
