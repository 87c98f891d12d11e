"""The chat page (gpt/serve/chat.html) in a real headless Chromium, against the real server: serve.py
on a tiny character-level checkpoint, started as a user would."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.serve.conftest import serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PAGE = ROOT / "gpt" / "serve" / "chat.html"
KEY = "sk-page-test"

pytestmark = [
    # Its tests share the checkpoint, the server and the browser: one xdist worker runs them all.
    pytest.mark.xdist_group(__name__),
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
        reason="needs Chromium and its driver: apt-get install chromium chromium-driver",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(long_run):
    """serve.py on the long-context model (the next turn after a stopped answer of 1000 tokens still
    fits), ready; stopped afterwards."""
    with serving(long_run, f"api_key={KEY}") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def small_server(served_run):
    """serve.py, no key, on the model of 32 tokens of context: a conversation outgrows it at once."""
    with serving(served_run) as url:
        yield url


@pytest.fixture
def page(browser, server):
    """The page freshly loaded, no key stored, with each request body it sends kept in __bodies."""
    browser.get(server + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(server + "/")
    record_bodies(browser)
    return browser


def record_bodies(driver) -> None:
    driver.execute_script("""
        window.__bodies = [];
        const fetch0 = window.fetch;
        window.fetch = (url, init) => {
            if (init && init.body) window.__bodies.push(JSON.parse(init.body));
            return fetch0(url, init);
        };
    """)


def request(url: str, key: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, with `Authorization: Bearer key` if key."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def error_message(url: str, key: str | None) -> str:
    code, _, body = request(url + "/v1/models", key)
    assert code == 401, (code, body)
    return json.loads(body)["error"]["message"]


def model_id(url: str) -> str:
    code, _, body = request(url + "/v1/models", KEY)
    assert code == 200, body
    return json.loads(body)["data"][0]["id"]


# ----------------------------------------------------------------------------- page helpers


def el(driver, id_: str):
    return driver.find_element(By.ID, id_)


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def text(element) -> str:
    return element.get_property("textContent")  # not .text: that one trims and folds whitespace


def set_field(driver, id_: str, value) -> None:
    field = el(driver, id_)
    field.clear()
    field.send_keys(str(value))


def enter_key(driver, key: str, model: str) -> None:
    """Types the key, leaves the field (its change event fetches the models) and waits for the model."""
    set_field(driver, "key", key)
    el(driver, "input").click()
    wait(driver, lambda: text(el(driver, "model")) == model)


def messages(driver) -> list[tuple[str, str, str]]:
    """(role, class list, text) of each message on the page."""
    divs = driver.find_elements(By.CSS_SELECTOR, "#messages .message")
    roles = [("user" if "user" in c else "assistant", c) for c in (d.get_attribute("class") for d in divs)]
    return [(r, c, text(d)) for (r, c), d in zip(roles, divs, strict=True)]


def answered(driver, n: int):
    """Waits until the n-th assistant answer has ended (the stop button idle again); its div."""
    wait(driver, lambda: len(assistants(driver)) >= n and not el(driver, "stop").is_enabled())
    return assistants(driver)[n - 1]


def assistants(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


# ----------------------------------------------------------------------------- tests


def test_answer_streams_stops_and_the_conversation_goes_on(server, page):
    model = model_id(server)
    enter_key(page, KEY, model)
    assert not el(page, "stop").is_enabled()
    set_field(page, "max-tokens", 1000)  # an answer of seconds: time to watch it grow, then stop it
    el(page, "input").send_keys("Who is there?" + Keys.ENTER)

    wait(page, lambda: assistants(page) and text(assistants(page)[0]))
    answer = assistants(page)[0]
    first = len(text(answer))
    wait(page, lambda: len(text(answer)) > first, timeout=20)
    assert el(page, "stop").is_enabled() and not el(page, "send").is_enabled()  # still streaming
    el(page, "stop").click()

    wait(page, lambda: not el(page, "stop").is_enabled(), timeout=10)
    partial = text(answer)
    time.sleep(1.0)
    assert text(answer) == partial, "the answer went on growing after stop"
    assert "stopped" in answer.get_attribute("class").split()
    assert el(page, "send").is_enabled() and text(el(page, "error")) == ""
    assert len(partial) > first

    set_field(page, "max-tokens", 20)
    el(page, "input").send_keys("Speak again.")
    el(page, "send").click()
    second = answered(page, 2)
    assert text(second) and "stopped" not in second.get_attribute("class")
    assert [(r, t) for r, _, t in messages(page)] == [
        ("user", "Who is there?"),
        ("assistant", partial),
        ("user", "Speak again."),
        ("assistant", text(second)),
    ]
    assert text(el(page, "error")) == ""

    bodies = page.execute_script("return window.__bodies")
    assert len(bodies) == 2
    assert bodies[1] == {
        "model": model,
        "messages": [
            {"role": "user", "content": "Who is there?"},
            {"role": "assistant", "content": partial},  # the stopped answer is part of the conversation
            {"role": "user", "content": "Speak again."},
        ],
        "stream": True,
        "max_tokens": 20,
        "temperature": 0.8,
    }


def test_a_wrong_key_shows_the_servers_401_message(server, page):
    model = model_id(server)
    no_key, wrong = error_message(server, None), error_message(server, "sk-wrong")
    wait(page, lambda: text(el(page, "error")) == no_key)  # the models request on load

    set_field(page, "key", "sk-wrong")
    page.execute_script("document.getElementById('error').textContent = ''")  # see the new answer
    el(page, "input").click()
    wait(page, lambda: text(el(page, "error")) == wrong)

    enter_key(page, KEY, model)
    assert text(el(page, "error")) == ""
    page.refresh()  # the key is kept for the session
    assert el(page, "key").get_attribute("value") == KEY
    wait(page, lambda: text(el(page, "model")) == model)
    record_bodies(page)

    set_field(page, "max-tokens", 5)
    el(page, "input").send_keys("Hi" + Keys.ENTER)
    assert text(answered(page, 1))

    # A wrong key for the chat request itself (set without a change event: the model stays known).
    page.execute_script("document.getElementById('key').value = 'sk-wrong'")
    el(page, "input").send_keys("Hi again" + Keys.ENTER)
    wait(page, lambda: text(el(page, "error")) == wrong)
    assert [b["messages"][-1]["content"] for b in page.execute_script("return window.__bodies")] == [
        "Hi",
        "Hi again",
    ]
    # The turn that got no answer is taken back, its text returned to the box.
    assert [r for r, _, _ in messages(page)] == ["user", "assistant"]
    assert el(page, "input").get_property("value") == "Hi again"
    assert not el(page, "stop").is_enabled() and el(page, "send").is_enabled()

    set_field(page, "key", KEY)
    el(page, "send").click()
    assert text(answered(page, 2))
    assert text(el(page, "error")) == ""  # cleared by the send
    assert [r for r, _, _ in messages(page)] == ["user", "assistant", "user", "assistant"]


def test_the_page_comes_from_the_server_and_asks_nothing_of_another_origin(server, page):
    code, content_type, body = request(server + "/")
    assert code == 200 and content_type.startswith("text/html")
    html = PAGE.read_text(encoding="utf-8")
    assert body == html
    assert "://" not in html  # no absolute URL at all, so none in a src or href
    assert not re.search(r"""\b(?:src|href|action)\s*=\s*["']?\s*//""", html, re.I)  # nor //host/...

    enter_key(page, KEY, model_id(server))
    set_field(page, "max-tokens", 5)
    markup = "<b>bold</b> <img src=x onerror=\"document.title='injected'\">"
    el(page, "input").send_keys(markup + Keys.ENTER)
    answered(page, 1)
    user = page.find_element(By.CSS_SELECTOR, "#messages .message.user")
    assert text(user) == markup and user.find_elements(By.XPATH, "./*") == []  # text, not markup
    assert page.title != "injected"

    loaded = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith("/v1/chat/completions") for u in loaded), loaded
    assert all(u.startswith(server + "/") for u in loaded), loaded


def test_a_conversation_past_the_context_leaves_out_its_oldest_turns(small_server, browser):
    browser.get(small_server + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(small_server + "/")
    record_bodies(browser)
    wait(browser, lambda: text(el(browser, "model")) == "run")
    set_field(browser, "max-tokens", 6)
    el(browser, "input").send_keys("Who is there?" + Keys.ENTER)  # 14 tokens, with its newline
    first = answered(browser, 1)
    el(browser, "input").send_keys("Speak again." + Keys.ENTER)  # 14 + 7 + 13 + 6 > 32: refused, then
    second = answered(browser, 2)  # asked again without the first exchange
    assert text(el(browser, "error")) == "" and text(second)
    classes = [c.split() for _, c, _ in messages(browser)]
    assert ["forgotten" in c for c in classes] == [True, True, False, False]
    bodies = browser.execute_script("return window.__bodies")
    assert [b["messages"] for b in bodies] == [
        [{"role": "user", "content": "Who is there?"}],
        [
            {"role": "user", "content": "Who is there?"},
            {"role": "assistant", "content": text(first)},
            {"role": "user", "content": "Speak again."},
        ],
        [{"role": "user", "content": "Speak again."}],
    ]
    # A message too long on its own: the server's line, the turn taken back, nothing more left out.
    el(browser, "input").send_keys("A" * 40 + Keys.ENTER)
    wait(browser, lambda: "shorten the prompt" in text(el(browser, "error")))
    assert len(messages(browser)) == 4 and el(browser, "input").get_property("value") == "A" * 40
    assert ["forgotten" in c.split() for _, c, _ in messages(browser)] == [True, True, False, False]
