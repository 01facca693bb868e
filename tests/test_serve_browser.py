"""The web page of `captioner serve` in a real browser: headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/run) driven by selenium, against a uvicorn server on 127.0.0.1."""

import io
import shutil

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from PIL import Image  # noqa: E402

from captioner.config import DecodeConfig  # noqa: E402
from captioner.serve.app import create_app, serving  # noqa: E402
from captioner.serve.settings import ServeConfig  # noqa: E402


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:  # a failure, not a skip: CI must run this test (.ci/run installs them)
        pytest.fail("the browser test needs Chromium and its driver: apt-get install chromium chromium-driver "
                    f"(found chromium={browser}, chromedriver={driver})")
    return browser, driver


def test_page_captions_an_uploaded_image(make_captioner, tmp_path):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()
    captioner = make_captioner()
    image = tmp_path / "square.png"
    Image.new("RGB", (48, 48), "teal").save(image)
    decode = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=6)  # what the page asks for by default
    buf = io.BytesIO()
    Image.open(image).save(buf, "PNG")
    expected = captioner.caption(buf.getvalue(), decode=decode)

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,800", "--no-proxy-server"):
        options.add_argument(flag)
    settings = ServeConfig(port=0)
    with serving(create_app(captioner, settings, DecodeConfig(max_new_tokens=6)), settings) as url:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url + "/")
            assert driver.find_element(By.CSS_SELECTOR, "label[for=files]").text.startswith("Drop images here")
            driver.find_element(By.ID, "files").send_keys(str(image))
            WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located(
                (By.CSS_SELECTOR, ".caption[data-state=done]")))
            caption = driver.find_element(By.CSS_SELECTOR, ".caption[data-state=done]").text
            thumbnail = driver.find_element(By.CSS_SELECTOR, "#results img")
            assert thumbnail.get_attribute("alt") == "uploaded image square.png"
            assert driver.execute_script("return arguments[0].naturalWidth", thumbnail) == 48
            driver.save_screenshot(str(tmp_path / "page.png"))
        finally:
            driver.quit()
    assert caption == expected
    assert (tmp_path / "page.png").stat().st_size > 1000
    print(f"browser test: caption {caption!r} shown; screenshot {tmp_path / 'page.png'}")
