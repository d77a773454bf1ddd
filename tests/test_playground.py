"""The steering playground: its HTTP side (the page and its files public, the API gated, the feature finder, /tokenize,
the on-disk cache) and the page itself in a real headless browser (Debian's chromium driven by chromedriver through
selenium) against a live `functok serve`: find a feature, add it, run, two different completions streamed side by side
with the steered positions highlighted and no console errors; the features of a token on hover and a one-request
strength sweep with p(target), each equal to what the API answers; a bad strength shown in words; a phone's width; a
steering vector from the server's library picked by name and run; a conditional edit and a position object set in
the page's controls (sent as that spec, shown as the API answers it, its steered positions as the server counts
them); a watched feature's per-token readout beside the tokens.

`FUNCTOK_UPDATE_SCREENSHOT=1` also copies the desktop screenshot to docs/playground.png (the README's picture).
"""

import math
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import ServerProc, is_error_body

KEY = "sk-play-1e4"
ADMIN = "sk-play-admin"
VECTOR = {"name": "mikh", "layer": 2, "features": [{"feature": 1493, "strength": 150.0}], "description": "README's"}
MODEL = "functok-tiny"
MAX_ABS = 400  # --max-abs-strength
MAX_TOKENS = 24
LAYER = 2
PROMPT = "At the levee Prince Andrew stood among the Austrian officers, and the Emperor merely nodded to him with his"
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("functok-home")  # a fresh feature cache: the first search computes it


def serve(tmp: Path, home: Path) -> ServerProc:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNCTOK_HOME", str(home))  # the library too: $FUNCTOK_HOME/library/functok-tiny
        return ServerProc(tmp, "--api-key", KEY, "--admin-api-key", ADMIN, "--max-abs-strength", str(MAX_ABS))


@pytest.fixture(scope="module")
def server(tmp_path_factory, home):
    s = serve(tmp_path_factory.mktemp("play"), home)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def ready(http, path: str, params=None, deadline_s: float = 120) -> tuple[dict, list[int]]:
    """(the 200 body, the statuses seen) of a finder endpoint, polling while it answers 202."""
    seen = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        r = http.get(path, params=params)
        seen.append(r.status_code)
        if r.status_code == 202:
            body = r.json()
            assert body["object"] == "features.progress" and 0 <= body["progress"] <= 1, body
            assert r.headers["Retry-After"] == "1"
            time.sleep(0.3)
            continue
        assert r.status_code == 200, r.text
        return r.json(), seen
    pytest.fail(f"{path} still computing after {deadline_s} s")


def completion(http, steering, **extra) -> dict:
    """The page's own request (its default sampling: temperature 0, MAX_TOKENS tokens), answered by the API."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "steering": steering}
    r = http.post("/v1/completions", json=body | extra)
    assert r.status_code == 200, r.text
    return r.json()


def spec_at(spec: dict, strength: float) -> dict:
    return {**spec, "edits": [spec["edits"][0] | {"strength": strength}]}


def greedy(http, steering=None) -> tuple[str, list[int], int]:
    """(text, token ids, steered_positions) of the API's greedy completion of PROMPT."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    if steering is not None:
        body["steering"] = steering
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["token_ids"], (r.json()["steering"] or {}).get("steered_positions", 0)


@pytest.fixture(scope="module")
def chosen(http):
    """(query, feature, strength, steered text and ids, unsteered text and ids): a layer-2 feature found by typing one
    of its logit-lens words into the finder, at the smallest strength (of a few) that changes the greedy text."""
    plain = greedy(http)
    for f in range(0, 2048, 7):
        card, _ = ready(http, f"/v1/features/{LAYER}/{f}")
        word = card["logit_lens"][0]["token"]
        if not re.fullmatch(r" [A-Za-z]{5,}", word):  # a whole word, as a person would type it
            continue
        word = word.strip()
        found, _ = ready(http, "/v1/features/search", {"q": word, "layer": LAYER, "limit": 20})
        if f not in [d["feature"] for d in found["data"]]:
            continue  # the page shows the first 20 results: the feature must be among them
        for strength in (100.0, 200.0, MAX_ABS):
            spec = {"edits": [{"layer": LAYER, "feature": f, "strength": strength}], "positions": "function"}
            steered = greedy(http, spec)
            if steered[0] != plain[0]:
                return word, f, strength, steered, plain
    pytest.fail("no layer-2 feature with a word as its top logit-lens token changes the greedy text")


# ---- the browser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"{' and '.join(missing)} not installed (make browser; pip install -e '.[dev]')"
        if os.environ.get("FUNCTOK_REQUIRE_BROWSER"):  # set by `make test`: CI must run the browser test
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_playground_in_a_browser(server, http, browser, request, tmp_path, demo_function_tokens, demo_tokenizer):
    """First in the module: the server has not computed its feature dashboards yet, so the page sees it do so."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    find = d.find_element

    # The server has an API key: the page asks for it on the 401, then starts.
    d.get(server.url + "/")
    wait.until(lambda d: find(By.ID, "key-form").is_displayed())
    assert "API key" in find(By.ID, "key-why").text
    assert all("401" in e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE")  # the expected refusal
    find(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    wait.until(lambda d: find(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert "functok-tiny" in find(By.ID, "server-line").text

    # Every control has a label (its own <label>, or aria-label / text for buttons).
    unlabeled = d.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')].filter(c => "
        "!(c.labels && c.labels.length) && !c.getAttribute('aria-label') && !c.textContent.trim())"
        ".map(c => c.outerHTML)"
    )
    assert unlabeled == []

    # The first search makes the server compute its feature dashboards: the page shows the progress, then results.
    d.execute_script(
        "window.sawProgress = false; const bar = document.getElementById('finder-progress');"
        "new MutationObserver(() => { if (!bar.hidden) window.sawProgress = bar.textContent; })"
        ".observe(bar, {attributes: true, subtree: true, childList: true, characterData: true});"
    )
    find(By.ID, "feature-query").send_keys("the", Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.result"))
    assert "Computing the feature dashboards" in d.execute_script("return window.sawProgress")

    # Find the chosen feature through the finder and add it.
    word, feature, strength, (steered_text, steered_ids, _), (plain_text, _, _) = request.getfixturevalue("chosen")
    find(By.ID, "feature-query").clear()
    find(By.ID, "feature-query").send_keys(word)
    Select(find(By.ID, "feature-layer")).select_by_value(str(LAYER))
    find(By.ID, "feature-query").send_keys(Keys.ENTER)
    result = f'button.result[data-layer="{LAYER}"][data-feature="{feature}"]'
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, result))
    find(By.CSS_SELECTOR, result).click()
    wait.until(lambda d: d.find_elements(By.ID, "add-feature"))
    card = find(By.ID, "feature-card").text
    assert f"Layer {LAYER}, feature {feature}" in card and word in card
    find(By.ID, "add-feature").click()
    number = find(By.CSS_SELECTOR, "#edits .strength-number")
    number.clear()
    number.send_keys(str(strength))
    assert Select(find(By.ID, "positions")).first_selected_option.get_attribute("value") == "function"
    tokens = find(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))

    # Run with Ctrl+Enter; both panels stream to the end. A short run can pass through "running" between two
    # polls, so the page records every state the steered panel takes.
    d.execute_script(
        "window.steeredStates = []; const panel = document.getElementById('panel-steered');"
        "new MutationObserver(() => window.steeredStates.push(panel.dataset.state))"
        ".observe(panel, {attributes: true, attributeFilter: ['data-state']});"
    )
    t0 = time.monotonic()
    find(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    states = ("panel-steered", "panel-plain")
    wait.until(lambda d: all(find(By.ID, p).get_attribute("data-state") in ("done", "error") for p in states))
    assert "running" in d.execute_script("return window.steeredStates")
    wait.until(lambda d: find(By.CSS_SELECTOR, "#panel-steered .count").text)
    errors = [find(By.CSS_SELECTOR, f"#{p} .error").text for p in states]
    assert [find(By.ID, p).get_attribute("data-state") for p in states] == ["done", "done"], errors
    text_of = "return document.querySelector(arguments[0] + ' .text').textContent"
    got_steered, got_plain = d.execute_script(text_of, "#panel-steered"), d.execute_script(text_of, "#panel-plain")
    assert got_steered != got_plain
    assert (got_steered, got_plain) == (steered_text, plain_text)  # what the API answers on its own
    print(f"run in the browser: {time.monotonic() - t0:.1f} s")

    # Highlighted steered positions: generated function tokens fed back (all but the last), and prompt tokens;
    # the page's count equals the server's.
    fn = set(demo_function_tokens.ids)
    highlighted = d.find_elements(By.CSS_SELECTOR, "#panel-steered .text .tok.steered")
    assert len(highlighted) == sum(i in fn for i in steered_ids[:-1])
    in_prompt = d.find_elements(By.CSS_SELECTOR, "#panel-steered .prompt-strip .tok.steered")
    assert len(highlighted) + len(in_prompt) >= 1
    count = find(By.CSS_SELECTOR, "#panel-steered .count")
    assert count.get_attribute("data-page") == count.get_attribute("data-server") != ""
    assert int(count.get_attribute("data-server")) == len(highlighted) + len(in_prompt)
    assert d.find_elements(By.CSS_SELECTOR, "#panel-plain .tok.steered") == []

    # Hovering a token explains it and lists the features that fired where it was predicted: the API's own.
    from selenium.webdriver import ActionChains

    spec = {
        "edits": [{"layer": LAYER, "feature": feature, "mode": "add", "strength": strength}],
        "positions": "function",
    }
    api = completion(http, spec, features={"layers": [LAYER], "top_k": 5})["choices"][0]["features"][0]
    ActionChains(d).move_to_element(find(By.CSS_SELECTOR, "#panel-steered .text .tok")).perform()
    wait.until(lambda d: "Generated token 1" in find(By.ID, "token-info").text)
    info = find(By.ID, "token-info").text
    assert f"where it was predicted (position {api['position']})" in info, info
    shown = ", ".join(f"#{f} ({a:.2f})" for f, a in api["layers"][str(LAYER)])
    assert f"Layer {LAYER}: {shown}" in info, (info, shown)

    # The strength sweep, one click, one request (a list of specs): the chosen edit at several strengths, one text
    # per strength (strength 0 is the unsteered text, the chosen strength the steered one) and p(target), the
    # API's probability of the target as the first token.
    first = completion(http, None, return_token_ids=True)["choices"][0]["token_ids"][0]
    target = demo_tokenizer.decode([first])  # the unsteered first token: likely among the 20 at every strength
    find(By.ID, "sweep-target").send_keys(target)
    sent = "return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v1/completions')).length"
    before = d.execute_script(sent)
    find(By.ID, "sweep-run").click()
    wait.until(lambda d: find(By.ID, "sweep-table").is_displayed())
    assert d.execute_script(sent) == before + 1
    cells = [
        (float(r.find_element(By.TAG_NAME, "th").text), *(c.text for c in r.find_elements(By.TAG_NAME, "td")))
        for r in d.find_elements(By.CSS_SELECTOR, "#sweep-table tbody tr")
    ]
    rows = {s: text for s, _, text in cells}
    assert len(rows) >= 4 and max(rows) <= MAX_ABS, rows
    assert rows[0.0] == plain_text and rows[strength] == steered_text, rows
    for s_, p_shown, _ in cells:
        top = completion(http, spec_at(spec, s_), logprobs=20)["choices"][0]["logprobs"]["top_logprobs"][0]
        hit = top.get(target, next((v for t, v in top.items() if t.strip() == target.strip()), None))  # as the page
        want = None if hit is None else math.exp(hit)
        assert p_shown == ("–" if want is None else f"{want:.3f}"), (s_, p_shown, want, target)
    assert any(p != "–" for _, p, _ in cells) and d.find_elements(By.CSS_SELECTOR, "#sweep-chart svg circle")

    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    shot = tmp_path / "playground.png"
    d.set_window_size(1280, min(d.execute_script("return document.documentElement.scrollHeight") + 140, 1600))
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("FUNCTOK_UPDATE_SCREENSHOT"):
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SHOT)

    # A strength beyond the server's limit: the API's 400 is shown in words, the unsteered panel still completes.
    number = find(By.CSS_SELECTOR, "#edits .strength-number")
    number.clear()
    number.send_keys(str(MAX_ABS + 100))
    find(By.ID, "run").click()
    wait.until(lambda d: all(find(By.ID, p).get_attribute("data-state") in ("done", "error") for p in states))
    assert find(By.ID, "panel-steered").get_attribute("data-state") == "error"
    message = find(By.CSS_SELECTOR, "#panel-steered .error").text
    assert "refused" in message and f"exceeds the limit of {MAX_ABS}" in message and "steering.edits[0]" in message
    assert find(By.ID, "panel-plain").get_attribute("data-state") == "done"

    # No connection: both panels say so in words.
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
    try:
        find(By.ID, "run").click()
        wait.until(lambda d: all(find(By.ID, p).get_attribute("data-state") == "error" for p in states))
        for p in states:
            assert "Could not reach the server" in find(By.CSS_SELECTOR, f"#{p} .error").text
    finally:
        d.execute_cdp_cmd("Network.emulateNetworkConditions", offline | {"offline": False})

    # A phone's width: one column, the completions stacked, nothing wider than the screen.
    d.set_window_size(1280, 900)
    d.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    try:
        wait.until(lambda d: d.execute_script("return window.innerWidth") == 390)
        widths = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], widths
        top = "return document.getElementById(arguments[0]).getBoundingClientRect()"
        steered_box, plain_box = d.execute_script(top, "panel-steered"), d.execute_script(top, "panel-plain")
        assert steered_box["bottom"] <= plain_box["top"]  # stacked, not side by side
        order = d.execute_script(
            "return [...document.querySelectorAll('main section h2')]"
            ".sort((a, b) => a.getBoundingClientRect().top - b.getBoundingClientRect().top).map(h => h.id)"
        )
        assert order == ["prompt-title", "edits-title", "out-title", "finder-title", "sweep-title"]
        assert d.save_screenshot(str(tmp_path / "playground-phone.png"))
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_named_vector_in_the_browser(server, http, browser):
    """The library's vectors are offered as edits: pick one by name, run, and the page shows what the API returns."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    r = http.post("/v1/steering/vectors", json=VECTOR, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    spec = {"edits": [{"vector": "mikh", "strength": 1.0}], "positions": "function"}
    steered, plain = greedy(http, spec), greedy(http)
    assert steered[0] != plain[0]
    d, find = browser, browser.find_element
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    d.get_log("browser")  # drop what the previous test logged (its refused strength, its offline runs)
    d.get(server.url + "/")
    wait.until(
        lambda d: find(By.ID, "key-form").is_displayed() or find(By.TAG_NAME, "body").get_attribute("data-ready")
    )
    if find(By.ID, "key-form").is_displayed():  # run alone: this tab has no key yet
        find(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    wait.until(lambda d: find(By.ID, "vector-picker").is_displayed())
    options = [o.get_attribute("value") for o in Select(find(By.ID, "vector-name")).options]
    assert options == ["mikh"] and "mikh (layer 2)" in find(By.ID, "vector-name").text
    find(By.ID, "add-vector").click()
    row = find(By.CSS_SELECTOR, '#edits li[data-vector="mikh"]')
    assert "vector mikh at layer 2" in row.text
    assert find(By.CSS_SELECTOR, "#edits .strength-number").get_attribute("value") == "1"
    tokens = find(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    find(By.ID, "run").click()
    states = ("panel-steered", "panel-plain")
    wait.until(lambda d: all(find(By.ID, p).get_attribute("data-state") in ("done", "error") for p in states))
    text_of = "return document.querySelector(arguments[0] + ' .text').textContent"
    assert (d.execute_script(text_of, "#panel-steered"), d.execute_script(text_of, "#panel-plain")) == (
        steered[0],
        plain[0],
    )
    assert [e for e in d.get_log("browser") if e["level"] == "SEVERE"] == []


def one_edit(d, url: str) -> None:
    """A fresh page (earlier tests' browser log dropped) with one edit: layer LAYER, feature 1493, strength 150."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d.get_log("browser")
    page_ready(d, url)
    d.find_element(By.ID, "add-edit").click()
    Select(d.find_element(By.ID, "edit-0-layer")).select_by_value(str(LAYER))
    for name, typed in (("edit-0-feature", "1493"), ("edit-0-strength", "150")):
        d.find_element(By.ID, name).clear()
        d.find_element(By.ID, name).send_keys(typed, "\t")


def page_ready(d, url: str) -> None:
    """Open the page in this tab, entering the key when the tab has none yet."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    find = d.find_element
    d.get(url + "/")
    ready_or_key = lambda d: (
        find(By.ID, "key-form").is_displayed()
        or find(By.TAG_NAME, "body").get_attribute(  # noqa: E731
            "data-ready"
        )
    )
    WebDriverWait(d, 60, poll_frequency=0.1).until(ready_or_key)
    if find(By.ID, "key-form").is_displayed():  # run alone: this tab has no key yet
        find(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    WebDriverWait(d, 60, poll_frequency=0.1).until(lambda d: find(By.TAG_NAME, "body").get_attribute("data-ready"))


def test_a_condition_and_a_position_object_in_the_browser(server, http, browser, demo_function_tokens):
    """An add of feature 1493 with a condition ("only where feature F of this layer is above x") and a position object
    (function tokens, narrowed to the last 8 prompt tokens or the first 6 generated, one id excluded) set in the page's
    controls: the page sends exactly that spec, shows the API's own text for it, and highlights the positions the
    server counted. Then the last 3 function tokens with an id allowlist and the strength in token norms, prompt tokens
    picked into the allowlist and excludes by click and keyboard, a phone's width with the picker open. A bad window
    shows the API's 400 naming the field; a malformed id list is refused in words before anything is sent; a chat
    roles selection shows the server's count and says why the page cannot mark the prompt."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    fn = set(demo_function_tokens.ids)
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    excluded = next(t for t in prompt_ids[-8:] if t in fn)  # a function token inside the window
    positions = {"select": "function", "exclude_ids": [excluded], "first_generated": 6, "last_prompt": 8}
    add = {"layer": LAYER, "feature": 1493, "mode": "add", "strength": 150.0}
    plain, unconditional = greedy(http), greedy(http, {"edits": [add], "positions": positions})
    # A condition that matters: the API's text differs from both the unsteered and the unconditional one.
    for cond in ({"feature": 1493, "above": 0.5}, {"feature": 766, "above": 1.0}, {"feature": 29, "below": 2.0}):
        spec = {"edits": [add | {"when": cond}], "positions": positions}
        steered = greedy(http, spec)
        if steered[0] not in (plain[0], unconditional[0]):
            break
    else:
        pytest.fail("no condition among the candidates changes the text of the unconditional edit")
    side, value = next((k, v) for k, v in cond.items() if k != "feature")

    d, find = browser, browser.find_element
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    one_edit(d, server.url)
    assert Select(find(By.ID, "edit-0-unit")).first_selected_option.get_attribute("value") == "absolute"
    Select(find(By.ID, "edit-0-when-kind")).select_by_value("feature")
    find(By.ID, "edit-0-when-feature").clear()
    find(By.ID, "edit-0-when-feature").send_keys(str(cond["feature"]), "\t")
    Select(find(By.ID, "edit-0-when-side")).select_by_value(side)
    find(By.ID, "edit-0-when-value").clear()
    find(By.ID, "edit-0-when-value").send_keys(str(value))
    find(By.CSS_SELECTOR, "#narrow summary").click()
    assert all(not box.is_enabled() for box in d.find_elements(By.CSS_SELECTOR, "#pos-roles input"))  # completion
    fields = {"pos-exclude-ids": str(excluded), "pos-first-generated": "6", "pos-last-prompt": "8"}
    for name, typed in fields.items():
        find(By.ID, name).send_keys(typed)
    assert 'sends "positions": ' in find(By.ID, "positions-help").text
    unlabeled = d.execute_script(  # the new controls are labelled too
        "return [...document.querySelectorAll('#edits-title ~ * input, #edits-title ~ * select')]"
        ".filter(c => !(c.labels && c.labels.length) && !c.getAttribute('aria-label')).map(c => c.outerHTML)"
    )
    assert unlabeled == [] and d.find_elements(By.ID, "edit-0-when-value")
    # A phone's width with the position picker open and a conditional edit: nothing wider than the screen.
    d.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    try:
        wait.until(lambda d: d.execute_script("return window.innerWidth") == 390)
        widths = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1] and find(By.ID, "pos-token-ids").is_displayed(), widths
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    tokens = find(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))

    # Record the bodies the page sends, then run.
    d.execute_script(
        "window.sent = []; const f = window.fetch; window.fetch = (url, o) => {"
        " if (String(url).endsWith('/completions')) window.sent.push(JSON.parse(o.body)); return f(url, o); };"
    )
    states = ("panel-steered", "panel-plain")
    done = lambda d: all(find(By.ID, p).get_attribute("data-state") in ("done", "error") for p in states)  # noqa: E731
    find(By.ID, "run").click()
    wait.until(done)
    wait.until(lambda d: find(By.CSS_SELECTOR, "#panel-steered .count").text)
    errors = [find(By.CSS_SELECTOR, f"#{p} .error").text for p in states]
    assert [find(By.ID, p).get_attribute("data-state") for p in states] == ["done", "done"], errors
    sent = [b["steering"] for b in d.execute_script("return window.sent") if "steering" in b]
    assert sent == [spec], sent
    text_of = "return document.querySelector(arguments[0] + ' .text').textContent"
    assert (d.execute_script(text_of, "#panel-steered"), d.execute_script(text_of, "#panel-plain")) == (
        steered[0],
        plain[0],
    )
    # Highlighted: the first 6 generated tokens fed back that are function tokens and not excluded (computed here),
    # the page's count is theirs, the server's is the API's own (where the condition held: fewer), and the line says
    # the condition gates them further.
    want = sum(t in fn and t != excluded for t in steered[1][:-1][:6])
    assert len(d.find_elements(By.CSS_SELECTOR, "#panel-steered .text .tok.steered")) == want
    in_prompt = sum(t in fn and t != excluded for t in prompt_ids[-8:])
    assert len(d.find_elements(By.CSS_SELECTOR, "#panel-steered .prompt-strip .tok.steered")) == in_prompt
    count = find(By.CSS_SELECTOR, "#panel-steered .count")
    assert count.get_attribute("data-page") == str(want + in_prompt)
    assert count.get_attribute("data-server") == str(steered[2]) and steered[2] <= want + in_prompt
    assert "where their condition held" in count.text and "off by" not in count.text

    # A prompt token's id into the picker: a click on the strip, or its arrow keys and Enter (Shift: exclude).
    find(By.CSS_SELECTOR, '#panel-steered .prompt-strip [data-prompt="0"]').click()
    strip = find(By.CSS_SELECTOR, "#panel-steered .prompt-strip")
    j = next(i for i, t in enumerate(prompt_ids) if t not in (excluded, prompt_ids[0]))
    strip.send_keys(*[Keys.ARROW_RIGHT] * j)  # the clicked token is the current one: j tokens on
    strip.send_keys(Keys.SHIFT, Keys.ENTER)
    picked = [find(By.ID, name).get_attribute("value") for name in ("pos-token-ids", "pos-exclude-ids")]
    assert picked == [str(prompt_ids[0]), f"{excluded}, {prompt_ids[j]}"], picked
    find(By.ID, "pos-token-ids").clear()
    find(By.ID, "pos-exclude-ids").clear()
    find(By.ID, "pos-exclude-ids").send_keys(str(excluded))

    # The last 3 function tokens of the prompt, and only the prompt's function-token ids but that of the first of
    # them (any selector: "all"): the page marks the positions computed here, and the server counts those of them
    # where the condition held (the API's own count, no more). The window and the allowlist each matter: without
    # either, other positions would be marked.
    fn_all = [i for i, t in enumerate(prompt_ids) if t in fn]
    fn_at = fn_all[-3:]
    allow = sorted({prompt_ids[i] for i in fn_all} - {prompt_ids[fn_at[0]]})
    want_marked = [i for i in fn_at if prompt_ids[i] in allow]
    assert want_marked not in ([i for i in fn_all if prompt_ids[i] in allow], fn_at) and want_marked
    Select(find(By.ID, "positions")).select_by_value("all")
    for name in fields:
        find(By.ID, name).clear()
    find(By.ID, "pos-last-functions").send_keys("3")
    find(By.ID, "pos-token-ids").send_keys(", ".join(map(str, allow)))
    Select(find(By.ID, "edit-0-unit")).select_by_value("token_norm")  # the strength becomes 0.5 (× token norm)
    find(By.ID, "run").click()
    wait.until(done)
    narrowed = {
        "edits": [add | {"strength": 0.5, "strength_unit": "token_norm", "when": cond}],
        "positions": {"select": "all", "token_ids": allow, "last_functions": 3},
    }
    assert d.execute_script("return window.sent")[-1]["steering"] == narrowed
    api_text, _, api_count = greedy(http, narrowed)
    assert d.execute_script(text_of, "#panel-steered") == api_text
    marked = [int(s.get_attribute("data-prompt")) for s in d.find_elements(By.CSS_SELECTOR, ".prompt-strip .steered")]
    assert marked == want_marked
    count = find(By.CSS_SELECTOR, "#panel-steered .count")  # the server: those of them where the condition held
    assert count.get_attribute("data-page") == str(len(marked)) and count.get_attribute("data-server") == str(api_count)
    assert api_count <= len(marked) and "off by" not in count.text
    find(By.ID, "pos-last-functions").clear()
    find(By.ID, "pos-token-ids").clear()
    Select(find(By.ID, "positions")).select_by_value("function")
    Select(find(By.ID, "edit-0-unit")).select_by_value("absolute")
    find(By.ID, "edit-0-strength").clear()
    find(By.ID, "edit-0-strength").send_keys("150")
    for name, typed in fields.items():
        find(By.ID, name).send_keys(typed)

    # A window of 0 tokens: the API's 400 names the field, in words; the unsteered panel still completes.
    find(By.ID, "pos-first-generated").clear()
    find(By.ID, "pos-first-generated").send_keys("0")
    bad = {**spec, "positions": positions | {"first_generated": 0}}
    api = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "steering": bad})
    err = is_error_body(api, 400)
    find(By.ID, "run").click()
    wait.until(done)
    assert [find(By.ID, p).get_attribute("data-state") for p in states] == ["error", "done"]
    message = find(By.CSS_SELECTOR, "#panel-steered .error").text
    assert "refused the request (400)" in message and err["message"] in message, (message, err)
    assert "steering.positions.first_generated" in message

    # An id list the page cannot read: refused in words, nothing steered sent.
    find(By.ID, "pos-first-generated").clear()
    find(By.ID, "pos-token-ids").send_keys("262, the")
    before = len(d.execute_script("return window.sent"))
    find(By.ID, "run").click()
    wait.until(done)
    message = find(By.CSS_SELECTOR, "#panel-steered .error").text
    assert message == 'Not sent: Only token ids: "the" is not a token id (a whole number).', message
    assert all("steering" not in b for b in d.execute_script("return window.sent")[before:])

    # Chat, the user's message only: the page highlights nothing in the prompt and shows the server's count.
    find(By.ID, "pos-token-ids").clear()
    for name in ("pos-exclude-ids", "pos-last-prompt"):
        find(By.ID, name).clear()
    find(By.CSS_SELECTOR, 'input[name="api-mode"][value="chat"]').click()
    find(By.CSS_SELECTOR, 'input[name="pos-role"][value="user"]').click()
    find(By.ID, "run").click()
    wait.until(done)
    assert find(By.ID, "panel-steered").get_attribute("data-state") == "done"
    wait.until(lambda d: find(By.CSS_SELECTOR, "#panel-steered .count").text)
    chat = d.execute_script("return window.sent")[-1]
    assert chat["steering"]["positions"] == {"select": "function", "roles": ["user"]}, chat["steering"]
    count = find(By.CSS_SELECTOR, "#panel-steered .count")
    chat_body = {k: chat[k] for k in ("model", "messages", "max_tokens", "temperature", "steering")}
    server_count = http.post("/v1/chat/completions", json=chat_body).json()["steering"]["steered_positions"]
    assert count.get_attribute("data-page") == "" and count.get_attribute("data-server") == str(server_count)
    assert "the page cannot see" in count.text and d.find_elements(By.CSS_SELECTOR, ".prompt-strip .tok.steered") == []
    expected = ("status of 400", "status of 401")  # the refused window; the key form when this test runs alone
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert [e for e in severe if not any(x in e["message"] for x in expected)] == [], severe


def test_a_watched_feature_in_the_browser(server, http, browser):
    """Watch feature 1493 at layer 2 while steering with it: each token of both completions carries the API's own
    readout value at its position (prompt tokens on the steered panel's strip too), the pooled line is the API's,
    hovering shows the value, and a feature outside the SAE shows the API's 400 naming the field."""
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    spec = {"edits": [{"layer": LAYER, "feature": 1493, "mode": "add", "strength": 150.0}], "positions": "function"}
    readout = {"features": [{"layer": LAYER, "feature": 1493}], "pool": ["mean", "max"], "prompt": True}
    api = {}
    for name, steering in (("steered", spec), ("plain", None)):
        choice = completion(http, steering, readout=readout)["choices"][0]
        api[name] = choice["readout"]
        assert len(api[name]["series"][0]["values"]) == len(api[name]["positions"]) > MAX_TOKENS
    assert api["steered"]["series"][0]["pooled"]["max"] > api["plain"]["series"][0]["pooled"]["max"]

    d, find = browser, browser.find_element
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    one_edit(d, server.url)
    Select(find(By.ID, "watch-layer")).select_by_value(str(LAYER))
    find(By.ID, "watch-feature").clear()
    find(By.ID, "watch-feature").send_keys("1493")
    tokens = find(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    states = ("panel-steered", "panel-plain")
    done = lambda d: all(find(By.ID, p).get_attribute("data-state") in ("done", "error") for p in states)  # noqa: E731
    find(By.ID, "run").click()
    wait.until(done)
    wait.until(lambda d: find(By.CSS_SELECTOR, "#panel-plain .watch-line").text)
    shown = "return [...document.querySelectorAll(arguments[0])].map(s => Number(s.dataset.watch))"
    strip = d.execute_script(shown, "#panel-steered .prompt-strip .tok")
    # The page's two requests run in one batch, the API's here one at a time: equal up to float32 summation order.
    close = dict(rel=1e-4, abs=1e-4)
    for name in ("steered", "plain"):
        values = api[name]["series"][0]["values"]
        text = d.execute_script(shown, f"#panel-{name} .text .tok")
        n = len(values) - len(text) + 1  # prompt positions, then every generated token but the last
        assert text[:-1] == pytest.approx(values[n:], **close), name
        if name == "steered":
            assert strip == pytest.approx(values[:n], **close)
        pooled = api[name]["series"][0]["pooled"]
        line = find(By.CSS_SELECTOR, f"#panel-{name} .watch-line").text
        mean, high = map(float, re.search(r"mean (\S+), max (\S+) over", line).groups())
        assert (mean, high) == pytest.approx((pooled["mean"], pooled["max"]), rel=1e-3, abs=1e-3), (line, pooled)
    top = max(v for name in api for v in api[name]["series"][0]["values"])
    bars = d.execute_script(
        "return [...document.querySelectorAll('.tok.watched')].map(s => Number(s.style.getPropertyValue('--w')))"
    )
    assert max(bars) == 1 and min(bars) >= 0 and top > 0
    ActionChains(d).move_to_element(find(By.CSS_SELECTOR, "#panel-steered .text .tok")).perform()
    first = d.execute_script(shown, "#panel-steered .text .tok")[0]
    wait.until(
        lambda d: f"Watched layer {LAYER} feature 1493 at this token: {first:.3f}" in find(By.ID, "token-info").text
    )

    # A feature outside the SAE: the API's 400 names the field, in both panels.
    find(By.ID, "watch-feature").clear()
    find(By.ID, "watch-feature").send_keys("2048")
    find(By.ID, "run").click()
    wait.until(done)
    for p in states:
        assert find(By.ID, p).get_attribute("data-state") == "error"
        message = find(By.CSS_SELECTOR, f"#{p} .error").text
        assert "refused the request (400)" in message and "readout.features[0].feature" in message, message
    Select(find(By.ID, "watch-layer")).select_by_value("")


# ---- HTTP --------------------------------------------------------------------------------------------------------


def test_page_and_files_are_public_the_api_is_not(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    scripts = re.findall(r'src="(/static/[^"]+)"', page.text)
    assert scripts == ["/static/main.js"]
    for name in (
        "main.js",
        "api.js",
        "edits.js",
        "condition.js",
        "positions.js",
        "finder.js",
        "run.js",
        "sweep.js",
        "state.js",
        "watch.js",
        "style.css",
    ):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.text, name
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", r.text), name  # nothing from elsewhere
    assert httpx.get(f"{server.url}/static/nothing.js").status_code == 404
    for path in ("/v1/features/search?q=a", "/v1/features/2/1", "/v1/steering"):
        is_error_body(httpx.get(server.url + path), 401, "invalid_api_key")
    is_error_body(httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}), 401, "invalid_api_key")


def test_steering_info_lists_capabilities(http):
    caps = http.get("/v1/steering").json()["capabilities"]
    assert caps == {"features": True, "logprobs": True, "readout": True, "spec_lists": True, "vectors": True}


def test_feature_card_matches_the_logit_lens_and_search_finds_it(http, demo_model, demo_saes):
    _, seen = ready(http, "/v1/features/search", {"q": "the"})
    assert seen[-1] == 200
    f = 1493
    card, _ = ready(http, f"/v1/features/{LAYER}/{f}")
    with torch.no_grad():  # the logit lens computed here, independently: W_dec row, final norm, unembedding
        scores = (demo_saes[LAYER].W_dec[f] * demo_model.model.norm.weight) @ demo_model.lm_head.weight.T
    want = scores.topk(10).indices.tolist()
    assert [t["id"] for t in card["logit_lens"]] == want
    assert card["d_sae"] == 2048 and 0 < card["frequency"] < 1 and card["corpus_tokens"] > 10000
    acts = [c["activation"] for c in card["contexts"]]
    assert acts and acts == sorted(acts, reverse=True) and acts[-1] > 0
    assert all(c["token"] and isinstance(c["left"], str) for c in card["contexts"])
    word = card["logit_lens"][0]["token"]
    found, _ = ready(http, "/v1/features/search", {"q": word.strip().upper(), "layer": LAYER, "limit": 100})
    hit = next(d for d in found["data"] if d["feature"] == f)
    assert hit["match"] == {
        "token": word,
        "id": want[0],
        "rank": 0,
        "score": pytest.approx(card["logit_lens"][0]["score"]),
    }
    assert all(word.strip().lower() in d["match"]["token"].lower() for d in found["data"])


@pytest.mark.parametrize(
    "path,params,status,param",
    [
        ("/v1/features/9/1", None, 404, "layer"),
        ("/v1/features/x/1", None, 404, "layer"),
        ("/v1/features/2/2048", None, 404, "feature"),
        ("/v1/features/2/-1", None, 404, "feature"),
        ("/v1/features/search", {}, 400, "q"),
        ("/v1/features/search", {"q": "a", "layer": "7"}, 400, "layer"),
        ("/v1/features/search", {"q": "a", "limit": "0"}, 400, "limit"),
        ("/v1/features/search", {"q": "a", "limit": "many"}, 400, "limit"),
        ("/v1/features/search", {"q": "a" * 101}, 400, "q"),
    ],
)
def test_finder_refuses_bad_input_naming_the_field(http, path, params, status, param):
    err = is_error_body(http.get(path, params=params), status)
    assert err["param"] == param, err


def test_tokenize_encodes_like_the_requests(http, demo_tokenizer):
    r = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == demo_tokenizer.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert "".join(r["token_strs"]) == PROMPT
    messages = [{"role": "user", "content": PROMPT}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    text = demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == demo_tokenizer.encode(text, add_special_tokens=False) and chat["token_strs"] is None
    assert is_error_body(http.post("/tokenize", json={}), 400)["param"] == "prompt"
    assert is_error_body(http.post("/tokenize", json={"prompt": "a", "model": "gpt-4"}), 404)["param"] == "model"


def test_a_restarted_server_loads_the_dashboards_from_disk(http, home, tmp_path):
    ready(http, f"/v1/features/{LAYER}/0")  # the first server has written its cache
    files = sorted((home / "features").glob("functok-tiny-layer*.safetensors"))
    assert [f.name.split("-")[2] for f in files] == ["layer0", "layer1", "layer2"]
    again = serve(tmp_path, home)
    try:
        with httpx.Client(base_url=again.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            card, _ = ready(c, f"/v1/features/{LAYER}/1493")
        assert card == ready(http, f"/v1/features/{LAYER}/1493")[0]
    finally:
        again.stop()
    log = again.log.read_text()
    assert log.count("loaded from") == 3 and "written to" not in log, log


@pytest.mark.parametrize(
    "method,path,mode",
    [
        ("GET", "/v1/features/search", "positive"),
        ("GET", "/v1/features/{layer}/{feature}", "positive"),
        ("POST", "/tokenize", "positive"),
        ("POST", "/tokenize", "negative"),
    ],
)
def test_schema_fuzz_of_the_playground_routes_never_gets_a_5xx(server, http, method, path, mode):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    ready(http, f"/v1/features/{LAYER}/0")  # fuzz the computed tables, not only the 202 answer
    auth = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=auth, timeout=30)
    seen = {}

    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema[path][method].as_strategy(generation_mode=GenerationMode(mode)))
    def fuzz(case):
        r = case.call(base_url=server.url, headers=auth, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (
            f"{case.path_parameters} {case.query} {case.body!r} -> {r.status_code} {r.text[:300]}"
        )
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text

    fuzz()
    assert sum(seen.values()) >= 1, seen
