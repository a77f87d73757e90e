"""The playground page in a real browser — headless Chromium from Debian's packages, driven by Selenium — against
live demo servers: the demo opens on base vs pirate vs pirate+british; two combinations picked, generated side by
side, give /generate's text; a token shows its logprob and alternatives; the copy-as snippets (curl, openai,
huggingface_hub) run and give the column's text; a sweep of one adapter's weight gives one column per weight, each
/generate's text at that weight; a merge built on the page, a JSON-schema column, a named tool call and an invalid
schema, each as the API answers them; a regex set for every column; a shared link restores the columns and their texts; the API-key prompt and a
tenant's view in every picker. Over HTTP: which of the page's paths are public, GET /operator, and the wheel shipping
the page.

MIXSERVE_SCREENSHOT=docs/playground.png saves the README's screenshot of a weighted sweep."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jsonschema
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import Select, WebDriverWait

from server.config import Settings
from tests.conftest import DEVICE, DTYPE, REPO, dtype_name

CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver (make install-test)
WAIT = 120  # seconds, for anything the page waits on
ADMIN, ACME = "admin-key-0001", "acme-key-0001"
DEMO_PROMPT = "Alice painted three red boxes near the park. "
PROMPT = "Grace counted five blue cups at the harbor. "


def demo_settings(**overrides) -> Settings:
    values = {"model": "demo", "adapters_dir": REPO / "adapters_store", "device": DEVICE, "dtype": dtype_name(DTYPE)}
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def demo(serve):
    return serve(demo_settings())


@pytest.fixture(scope="module")
def keyed(serve, tmp_path_factory):
    """The demo adapters in two tenants' namespaces, behind API keys."""
    store = tmp_path_factory.mktemp("playground-store")
    tenants = {"acme/pirate": "pirate", "acme/british": "british", "acme/digits": "digits", "globex/digits": "digits"}
    for name, source in tenants.items():
        shutil.copytree(REPO / "adapters_store" / source, store / name)
    return serve(demo_settings(adapters_dir=store, api_keys=f"{ADMIN},{ACME}:acme/"))


QUIET = (  # the browser calls nothing but the test's server: no updates, metrics, safe browsing, sync or crash reports
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
)
FEATURES_OFF = ("OptimizationHints", "MediaRouter", "Translate", "AutofillServerCommunication")


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMEDRIVER).exists(), "Chromium's driver is missing: make install-test installs it"
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *QUIET):
        options.add_argument(argument)
    options.add_argument("--disable-features=" + ",".join(FEATURES_OFF))
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def call(server, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=WAIT, **kwargs)


def generate(server, adapters: list, prompt: str, tokens: int, key: str | None = None, **parameters) -> httpx.Response:
    body = {
        "inputs": prompt,
        "adapters": adapters,
        "parameters": {"max_new_tokens": tokens, "details": True, "top_n_tokens": 5, **parameters},
    }
    response = call(server, "POST", "/generate", key, json=body)
    assert response.status_code == 200, response.text
    return response


def test_the_browser_runs_with_its_own_network_calls_off(browser):
    browser.get("chrome://version")
    command_line = browser.find_element(By.ID, "command_line").text
    flags = set(command_line.split())
    features = next(f for f in flags if f.startswith("--disable-features=")).partition("=")[2].split(",")
    assert set(QUIET) <= flags and set(FEATURES_OFF) <= set(features), command_line


# --- driving the page


def wait(browser, condition, message: str):
    return WebDriverWait(browser, WAIT).until(lambda d: condition(d), message)


def columns(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#columns .column")


def wait_until_generated(browser, count: int, expected: list[str] | None = None) -> None:
    states = lambda d: [c.get_attribute("data-state") for c in columns(d)]
    wait(browser, lambda d: len(states(d)) == count and all(s in ("done", "error") for s in states(d)), "generation")
    stats = [c.find_element(By.CLASS_NAME, "stats").text for c in columns(browser)]
    assert states(browser) == (expected or ["done"] * count), stats


def text_of(browser, column) -> str:
    """What the column shows as generated text (special tokens are drawn by CSS, not part of it)."""
    return browser.execute_script("return arguments[0].querySelector('.output').textContent", column)


def combination_of(column) -> str:
    return column.find_element(By.CLASS_NAME, "combination").text


def tick(browser, name: str, column: int) -> None:
    browser.find_element(By.CSS_SELECTOR, f'input[aria-label="{name} in column {column}"]').click()


def fill(browser, element_id: str, value: str) -> None:
    fill_element(browser.find_element(By.ID, element_id), value)


def fill_element(field, value: str) -> None:
    field.clear()
    field.send_keys(value)


def open_page(browser, server, path: str = "/playground") -> None:
    browser.get("about:blank")  # a link that differs only after '#' would not load the page again
    browser.get(server.url + path)
    wait(browser, lambda d: d.execute_script("return document.readyState") == "complete", "page load")


def open_ready(browser, server) -> None:
    open_page(browser, server)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#matrix tbody th"), "the adapters")


def snippet(browser, column, fmt: str) -> str:
    column.find_element(By.CSS_SELECTOR, f'.copy button[data-format="{fmt}"]').click()
    return browser.execute_script("return arguments[0].querySelector('.snippet code').textContent", column)


def run_curl(text: str, key: str | None = None) -> str:
    """The snippet run by bash (real curl); the text of its stream's last event."""
    env = {**os.environ, "MIXSERVE_API_KEY": key or ""}
    done = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=WAIT, env=env, check=True)
    events = [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("data:")]
    assert events and events[-1]["generated_text"] is not None, done.stdout
    return events[-1]["generated_text"]


def run_python(text: str) -> str:
    done = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.removesuffix("\n")


# --- in the browser


def test_the_demo_opens_on_base_pirate_and_pirate_british_side_by_side(demo, browser):
    open_page(browser, demo, "/")  # a browser's GET / lands on the playground
    assert browser.current_url == demo.url + "/playground"
    wait_until_generated(browser, 3)
    shown = columns(browser)
    assert [combination_of(c) for c in shown] == ["base model", "pirate", "pirate+british"]
    for column, adapters in zip(shown, [[], ["pirate"], ["pirate", "british"]], strict=True):
        assert text_of(browser, column) == generate(demo, adapters, DEMO_PROMPT, 80).json()["generated_text"]


def test_two_combinations_picked_stream_what_generate_answers(demo, browser):
    open_ready(browser, demo)
    wait_until_generated(browser, 3)
    browser.find_element(By.CSS_SELECTOR, 'button[aria-label="Remove column 3"]').click()
    tick(browser, "excited", 1)  # column 1: base -> excited + digits, picked out of canonical order
    tick(browser, "digits", 1)
    tick(browser, "pirate", 2)  # column 2: pirate -> british + signoff
    tick(browser, "british", 2)
    tick(browser, "signoff", 2)
    fill(browser, "prompt", PROMPT)
    fill(browser, "max-tokens", "40")
    browser.find_element(By.ID, "generate").click()
    wait_until_generated(browser, 2)

    shown = columns(browser)
    answers = [generate(demo, names, PROMPT, 40) for names in (["excited", "digits"], ["british", "signoff"])]
    assert [combination_of(c) for c in shown] == [a.headers["x-adapters"] for a in answers]
    assert [combination_of(c) for c in shown] == ["digits+excited", "signoff+british"]  # canonical order
    assert [text_of(browser, c) for c in shown] == [a.json()["generated_text"] for a in answers]

    # a token's logprob and its alternatives, as /generate's details give them
    details = answers[0].json()["details"]
    shown[0].find_elements(By.CSS_SELECTOR, ".tok")[2].click()
    info = shown[0].find_element(By.CLASS_NAME, "token-info")
    assert f"logprob {details['tokens'][2]['logprob']:.4f}" in info.text
    cells = info.find_elements(By.CSS_SELECTOR, "tr td:first-child")
    assert [json.loads(c.text) for c in cells] == [t["text"] for t in details["top_tokens"][2]]

    # each copy-as snippet, run, gives the column's text
    column_text = text_of(browser, shown[1])
    assert run_curl(snippet(browser, shown[1], "curl")) == column_text
    assert run_python(snippet(browser, shown[1], "openai")) == column_text
    assert run_python(snippet(browser, shown[1], "hub")) == column_text


def test_the_page_asks_for_a_key_and_shows_what_it_may_see(keyed, browser):
    open_page(browser, keyed)
    dialog = browser.find_element(By.ID, "key-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, "the key prompt")
    fill(browser, "key-input", "wrong-key-0001")
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, lambda d: "invalid API key" in d.find_element(By.ID, "key-error").text, "the key refused")

    fill(browser, "key-input", ACME)
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, lambda d: dialog.get_attribute("open") is None, "the key accepted")
    acme = {
        "matrix": ["acme/british", "acme/digits", "acme/pirate"],  # not globex/digits
        "sweep": ["acme/british", "acme/digits", "acme/pirate"],
        "merge": ["acme/digits"],  # the LoRA adapters
    }
    assert pickers(browser) == acme

    assert [combination_of(c) for c in columns(browser)] == ["base model", "acme/british"]  # not generated yet
    tick(browser, "acme/pirate", 2)
    fill(browser, "max-tokens", "30")
    browser.find_element(By.ID, "generate").click()
    wait_until_generated(browser, 2)
    column = columns(browser)[1]
    expected = generate(keyed, ["acme/british", "acme/pirate"], DEMO_PROMPT, 30, ACME).json()["generated_text"]
    assert text_of(browser, column) == expected
    curl = snippet(browser, column, "curl")
    assert ACME not in curl and "$MIXSERVE_API_KEY" in curl
    assert run_curl(curl, ACME) == expected

    # a shared link naming another tenant's adapters: they are left out of the columns and the pickers
    theirs = "merge:ties(globex/digits@1;density=0.5,majority_sign_method=total)"
    state = {
        "prompt": DEMO_PROMPT,
        "max_tokens": 10,
        "merges": [theirs],
        "columns": [{"adapters": [["acme/pirate", 0.5], ["globex/digits", 1], [theirs, 1]], "mode": {"kind": "text"}}],
    }
    open_page(browser, keyed, "/playground#" + urlencode({"state": json.dumps(state)}))
    wait_until_generated(browser, 1)
    assert [combination_of(c) for c in columns(browser)] == ["acme/pirate@0.5"]
    assert pickers(browser) == acme
    assert "globex" not in address_state(browser) and "Left out 3 " in browser.find_element(By.ID, "share-note").text

    # the operator's view spans every tenant: not for this key
    browser.find_element(By.ID, "tab-operator").click()
    wait(browser, lambda d: "without namespaces" in d.find_element(By.ID, "operator-status").text, "refusal")
    assert not browser.find_element(By.ID, "operator").is_displayed()

    # a key without namespaces sees every adapter, and the operator's view
    browser.find_element(By.ID, "change-key").click()
    fill(browser, "key-input", ADMIN)
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "operator").is_displayed(), "the operator's view")
    names = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#resident tbody tr td:first-child")]
    assert names == ["acme/british", "acme/pirate"]  # resident since the generation
    browser.find_element(By.ID, "tab-compare").click()
    every = ["acme/british", "acme/digits", "acme/pirate", "globex/digits"]
    assert pickers(browser) == {"matrix": every, "sweep": every, "merge": ["acme/digits", "globex/digits"]}

    # back to the tenant's key: the admin's picks of another tenant leave the columns, the merge note and the address
    browser.find_element(By.CSS_SELECTOR, 'input[aria-label="globex/digits in the merge"]').click()
    browser.find_element(By.ID, "merge-add").click()
    tick(browser, "globex/digits", 1)
    assert "globex" in address_state(browser) and "globex" in browser.find_element(By.ID, "merge-note").text
    browser.find_element(By.ID, "change-key").click()
    fill(browser, "key-input", ACME)
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is None, "the key accepted")
    assert [combination_of(c) for c in columns(browser)] == ["acme/pirate@0.5"] and pickers(browser) == acme
    assert "globex" not in address_state(browser) + browser.find_element(By.ID, "merge-note").text
    assert "globex" not in snippet(browser, columns(browser)[0], "curl")  # the column as shown now


def address_state(browser) -> str:
    """The page's state as its address holds it."""
    return parse_qs(urlsplit(browser.current_url).fragment)["state"][0]


def pickers(browser) -> dict[str, list[str]]:
    """The adapters each of the page's pickers offers."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.dataset.name ?? e.textContent)"
    selectors = {"matrix": "#matrix tbody th", "sweep": "#sweep-adapter option", "merge": "#merge-sources .source"}
    return {picker: browser.execute_script(script, selector) for picker, selector in selectors.items()}


def weight_field(browser, name: str, column: int):
    return browser.find_element(By.CSS_SELECTOR, f'input[aria-label="Weight of {name} in column {column}"]')


def select(browser, label: str, value: str) -> None:
    Select(browser.find_element(By.CSS_SELECTOR, f'select[aria-label="{label}"]')).select_by_value(value)


def test_a_sweep_gives_one_column_per_weight_as_generate_answers(demo, browser):
    open_ready(browser, demo)
    wait_until_generated(browser, 3)
    Select(browser.find_element(By.ID, "sweep-adapter")).select_by_visible_text("pirate")
    assert browser.find_element(By.ID, "sweep-weights").get_attribute("value") == "0, 0.3, 0.6, 1"
    browser.find_element(By.ID, "sweep-run").click()  # and it generates: 80 tokens, as the README's curl examples
    assert weight_field(browser, "pirate", 2).get_attribute("value") == "0.3"
    wait_until_generated(browser, 4)

    shown = columns(browser)
    weights = [0, 0.3, 0.6, 1]
    answers = [generate(demo, [{"name": "pirate", "weight": w}], DEMO_PROMPT, 80) for w in weights]
    assert [combination_of(c) for c in shown] == [a.headers["x-adapters"] or "base model" for a in answers]
    assert [combination_of(c) for c in shown] == ["base model", "pirate@0.3", "pirate@0.6", "pirate"]
    texts = [text_of(browser, c) for c in shown]
    assert texts == [a.json()["generated_text"] for a in answers]
    assert len(set(texts)) > 1  # the weight shows

    # the snippets carry the weight of the request sent
    curl = snippet(browser, shown[1], "curl")
    assert '"adapters":[{"name":"pirate","weight":0.3}]' in curl
    assert run_curl(curl) == texts[1]
    assert run_python(snippet(browser, shown[1], "openai")) == texts[1]
    assert run_python(snippet(browser, shown[1], "hub")) == texts[1]

    # a weight typed in shows in the column's combination (and the slider follows), and in its snippets, marked as
    # not what the shown text came from
    field = weight_field(browser, "pirate", 2)
    fill_element(field, "0.45")
    assert combination_of(shown[1]) == "pirate@0.45"
    slider = 'input[aria-label="Weight of pirate in column 2 (slider)"]'
    assert browser.find_element(By.CSS_SELECTOR, slider).get_attribute("value") == "0.45"
    assert '"adapters":[{"name":"pirate","weight":0.45}]' in snippet(browser, shown[1], "curl")
    assert "changed since it generated" in shown[1].find_element(By.CLASS_NAME, "copied").text
    # out of range: the range is said, and Generate sends nothing until the weight is one
    fill_element(field, "11")
    assert field.get_attribute("aria-invalid") == "true"
    assert "from -10 to 10" in shown[1].find_element(By.CLASS_NAME, "weight-error").text
    browser.find_element(By.ID, "generate").click()
    assert [c.get_attribute("data-state") for c in columns(browser)] == ["done"] * 4  # nothing sent
    assert browser.switch_to.active_element == field
    fill_element(field, "0.3")
    assert not shown[1].find_element(By.CLASS_NAME, "weight-error").text
    snippet(browser, shown[1], "curl")
    assert "changed since" not in shown[1].find_element(By.CLASS_NAME, "copied").text

    # the address holds the comparison: opened in this tab after the columns changed, it restores them and
    # generates the same texts
    link = browser.current_url
    assert "#state=" in link
    browser.find_element(By.CSS_SELECTOR, 'button[aria-label="Remove column 4"]').click()
    assert browser.switch_to.active_element.get_attribute("aria-label") == "Remove column 3"  # focus kept near
    assert browser.current_url != link
    browser.get(link)  # only the part after '#' differs: the same page, told by a hashchange
    wait_until_generated(browser, 4)
    assert [combination_of(c) for c in columns(browser)] == ["base model", "pirate@0.3", "pirate@0.6", "pirate"]
    assert [text_of(browser, c) for c in columns(browser)] == texts
    if os.environ.get("MIXSERVE_SCREENSHOT"):
        browser.save_screenshot(os.environ["MIXSERVE_SCREENSHOT"])


MERGE = "merge:ties(digits@0.7;density=0.5,majority_sign_method=total)"
SCHEMA = {  # the page's default schema
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "count"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
}
TOOL = {  # the page's default tool
    "name": "count_animals",
    "description": "How many animals someone has",
    "parameters": {
        "type": "object",
        "additionalProperties": False,
        "required": ["owner", "animal"],
        "properties": {"owner": {"enum": ["Alice", "Bob", "Grace"]}, "animal": {"enum": ["cats", "dogs", "birds"]}},
    },
}


def parsed_of(column) -> tuple[str, str]:
    """The column's verdict (valid or invalid, and its text) on what it wrote."""
    verdict = column.find_element(By.CSS_SELECTOR, ".parsed .verdict")
    return verdict.get_attribute("class").split()[-1], verdict.text


def test_a_merge_json_schema_and_tool_call_column_each_as_the_api_answers(demo, browser):
    open_ready(browser, demo)
    wait_until_generated(browser, 3)
    browser.find_element(By.CSS_SELECTOR, 'input[aria-label="digits in the merge"]').click()
    field = browser.find_element(By.CSS_SELECTOR, 'input[aria-label="Weight of digits in the merge"]')
    fill_element(field, "0.7")
    browser.find_element(By.ID, "merge-add").click()
    assert MERGE in browser.find_element(By.ID, "merge-note").text
    # other methods: only the options they take, named as the server writes them (it refuses any other spelling)
    for method, name in (
        ("cat", "merge:cat(digits@0.7)"),
        ("dare_linear_svd", "merge:dare_linear_svd(digits@0.7;density=0.5)"),
    ):
        Select(browser.find_element(By.ID, "merge-method")).select_by_value(method)
        fields = [browser.find_element(By.ID, f).is_displayed() for f in ("merge-density-field", "merge-sign-field")]
        assert fields == [method != "cat", False]
        browser.find_element(By.ID, "merge-add").click()
        assert name in browser.find_element(By.ID, "merge-note").text
        assert generate(demo, [name], PROMPT, 1).headers["x-adapters"] == name
    tick(browser, MERGE, 1)  # column 1: base -> the merge
    select(browser, "Output of column 2", "json")  # column 2: pirate, JSON
    select(browser, "Output of column 3", "tool")  # column 3: pirate+british, the named tool
    browser.find_element(By.ID, "add-column").click()
    select(browser, "Output of column 4", "json")  # column 4: an invalid schema
    schema = browser.find_element(By.CSS_SELECTOR, 'textarea[aria-label="JSON schema of column 4"]')
    fill_element(schema, '{"type": "objectx"}')
    fill(browser, "prompt", PROMPT)
    fill(browser, "max-tokens", "120")
    browser.find_element(By.ID, "generate").click()
    wait_until_generated(browser, 4, ["done", "done", "done", "error"])
    shown = columns(browser)
    texts = [text_of(browser, c) for c in shown]

    merged = generate(demo, [MERGE], PROMPT, 120)
    assert combination_of(shown[0]) == merged.headers["x-adapters"] == MERGE
    assert texts[0] == merged.json()["generated_text"]

    grammar = {"type": "json", "value": SCHEMA}
    assert texts[1] == generate(demo, ["pirate"], PROMPT, 120, grammar=grammar).json()["generated_text"]
    jsonschema.validate(json.loads(texts[1]), SCHEMA)
    assert parsed_of(shown[1]) == ("valid", "Valid against the schema.")
    assert json.loads(shown[1].find_element(By.CSS_SELECTOR, ".parsed pre").text) == json.loads(texts[1])

    body = {
        "model": "pirate+british",
        "messages": [{"role": "user", "content": PROMPT}],
        "tools": [{"type": "function", "function": TOOL}],
        "tool_choice": {"type": "function", "function": {"name": "count_animals"}},
        "max_tokens": 120,
        "temperature": 0,
    }
    reply = call(demo, "POST", "/v1/chat/completions", json=body).json()
    (tool_call,) = reply["choices"][0]["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "count_animals" and texts[2] == tool_call["function"]["arguments"]
    jsonschema.validate(json.loads(texts[2]), TOOL["parameters"])
    assert parsed_of(shown[2]) == ("valid", "Valid against count_animals's parameters.")
    assert "Call count_animals" in shown[2].find_element(By.CLASS_NAME, "parsed").text
    assert f"{reply['usage']['completion_tokens']} tokens" in shown[2].find_element(By.CLASS_NAME, "stats").text

    refused = call(
        demo,
        "POST",
        "/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": 120, "grammar": {"type": "json", "value": {"type": "objectx"}}},
        },
    )
    assert refused.status_code == 422
    assert shown[3].find_element(By.CLASS_NAME, "stats").text == f"error: {refused.json()['error']}"

    # the tool column's snippets, run, write the call's arguments; the JSON column's curl gives its text
    assert run_python(snippet(browser, shown[2], "openai")) == texts[2]
    assert run_python(snippet(browser, shown[2], "hub")) == texts[2]
    assert run_curl(snippet(browser, shown[1], "curl")) == texts[1]
    assert run_python(snippet(browser, shown[1], "openai")) == texts[1]  # vLLM's guided_json
    assert run_python(snippet(browser, shown[1], "hub")) == texts[1]  # TGI's grammar

    # the shared link brings back the merge, the modes and the texts
    link = browser.current_url
    browser.get("about:blank")
    browser.get(link)
    wait_until_generated(browser, 4, ["done", "done", "done", "error"])
    again = columns(browser)
    assert [text_of(browser, c) for c in again] == texts
    assert [combination_of(c) for c in again] == [MERGE, "pirate", "pirate+british", "base model"]
    kinds = [
        Select(c.find_element(By.CLASS_NAME, "mode-kind")).first_selected_option.get_attribute("value") for c in again
    ]
    assert kinds == ["text", "json", "tool", "json"]
    assert parsed_of(again[2])[0] == "valid"


HOLD = """
window.__aborted = 0;
window.__release = null;
const held = new Promise((resolve) => (window.__release = resolve));
const real = window.__realFetch ?? (window.__realFetch = window.fetch);
window.fetch = async (input, init = {}) => {
  if (!/generate_stream|chat\\/completions/.test(String(input))) return real(input, init);
  const aborted = new Promise((_, reject) => init.signal?.addEventListener("abort", () => {
    window.__aborted += 1;  // counted from the start: the page may cancel before the answer's headers come
    reject(new DOMException("aborted", "AbortError"));
  }));
  aborted.catch(() => {});
  const response = await real(input, init);
  const reader = response.body.getReader();
  const body = new ReadableStream({
    async pull(controller) {
      await Promise.race([held, aborted]);
      const { value, done } = await reader.read();
      done ? controller.close() : controller.enqueue(value);
    },
    cancel: (reason) => reader.cancel(reason),
  });
  return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
};
"""


def hold_streams(browser) -> None:
    """From now on the page's generation streams reach it only after release_streams (or their abort): what the page
    does while a column runs is tested without depending on the machine's speed."""
    browser.execute_script(HOLD)


def release_streams(browser) -> None:
    browser.execute_script("window.__release()")


def start_held(browser, count: int) -> None:
    hold_streams(browser)
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: [c.get_attribute("data-state") for c in columns(d)] == ["running"] * count, "running")


def live_busy(browser) -> list:
    script = "return [...document.querySelectorAll('#columns [aria-live]')].map((e) => e.getAttribute('aria-busy'))"
    return browser.execute_script(script)


def test_a_verdict_judges_what_the_column_sent_not_its_mode_edited_since(demo, browser):
    open_ready(browser, demo)
    wait_until_generated(browser, 3)
    regex = "(Arr|Hello), [a-z ]{1,20}\\."
    select(browser, "Output of column 1", "regex")
    fill_element(browser.find_element(By.CSS_SELECTOR, 'input[aria-label="Regex of column 1"]'), regex)
    select(browser, "Output of column 2", "json")
    select(browser, "Output of column 3", "tool")
    fill(browser, "max-tokens", "120")
    start_held(browser, 3)
    assert set(live_busy(browser)) == {"true"}  # a screen reader waits for the column's end to announce it

    # edited while the columns run: none of it was sent
    fill_element(browser.find_element(By.CSS_SELECTOR, 'input[aria-label="Regex of column 1"]'), "x")
    select(browser, "Output of column 2", "text")
    select(browser, "Output of column 3", "json")
    box = browser.find_element(By.CSS_SELECTOR, 'input[aria-label="digits in column 1"]')
    browser.execute_script("arguments[0].focus()", box)  # a keyboard user in the matrix
    release_streams(browser)
    wait_until_generated(browser, 3)
    shown = columns(browser)
    assert parsed_of(shown[0]) == ("valid", "Matches the regex.")
    assert parsed_of(shown[1]) == ("valid", "Valid against the schema.")
    assert parsed_of(shown[2]) == ("valid", "Valid against count_animals's parameters.")
    assert set(live_busy(browser)) == {None}

    # the matrix is drawn again with the adapters' new tiers: the focus stays on the same checkbox
    WebDriverWait(browser, WAIT).until(staleness_of(box), "the matrix redrawn")
    assert browser.switch_to.active_element.get_attribute("aria-label") == "digits in column 1"


def test_verdicts_of_answers_cut_invalid_unchecked_or_in_text(demo, browser):
    """max_tokens 1: a JSON object cut ('{'); an integer cut at '1' (JSON, below the schema's minimum, multipleOf not
    checked by the page); a forced tool call cut before the server sent it; tool_choice auto answered with text."""
    number = {"type": "integer", "minimum": 100, "multipleOf": 7}
    state = {
        "prompt": PROMPT,
        "max_tokens": 1,
        "columns": [
            {"adapters": [], "mode": {"kind": "json"}},
            {"adapters": [], "mode": {"kind": "json", "schema": json.dumps(number)}},
            {"adapters": [], "mode": {"kind": "tool", "choice": "bogus"}},  # not an option: the default, named
            {"adapters": [], "mode": {"kind": "tool", "choice": "auto"}},
        ],
    }
    open_page(browser, demo, "/playground#" + urlencode({"state": json.dumps(state)}))
    wait_until_generated(browser, 4)
    shown = columns(browser)
    cut = " It was cut at max tokens: raise Max tokens."
    assert parsed_of(shown[0]) == ("invalid", f"Not JSON.{cut}")
    assert text_of(browser, shown[1]) == "1"
    assert parsed_of(shown[1]) == (
        "invalid",
        f"Does not validate against the schema: $ is below 100. (not checked here: multipleOf){cut}",
    )
    whole = "the server sends a call whole"
    assert parsed_of(shown[2]) == (
        "invalid",
        f"No tool call: it was cut at max tokens before the call was complete ({whole}): raise Max tokens.",
    )
    assert text_of(browser, shown[2]) == ""
    choice = Select(shown[2].find_element(By.CLASS_NAME, "choice")).first_selected_option
    assert choice.get_attribute("value") == "named"
    kind, message = parsed_of(shown[3])
    assert kind == "note" and message.startswith("No tool call: the model answered with text, as tool_choice auto")


def test_a_removed_or_swept_column_cancels_its_request(demo, browser):
    three = [{"adapters": []}, {"adapters": [["pirate", 1]]}, {"adapters": [], "mode": {"kind": "regex"}}]
    state = {"prompt": PROMPT, "max_tokens": 5, "columns": three}
    open_page(browser, demo, "/playground#" + urlencode({"state": json.dumps(state)}))
    wait_until_generated(browser, 3)
    regex = {"type": "regex", "value": "[A-Z][a-z]+ has [0-9]+ (cats|dogs)\\."}  # the page's default
    cut = generate(demo, [], PROMPT, 5, grammar=regex).json()["generated_text"]
    assert text_of(browser, columns(browser)[2]) == cut and not re.fullmatch(regex["value"], cut)
    verdict = ("invalid", "Does not match the regex. It was cut at max tokens: raise Max tokens.")
    assert parsed_of(columns(browser)[2]) == verdict
    start_held(browser, 3)
    browser.find_element(By.CSS_SELECTOR, 'button[aria-label="Remove column 1"]').click()
    assert browser.execute_script("return window.__aborted") == 1
    assert browser.switch_to.active_element.get_attribute("aria-label") == "Remove column 1"  # the next column's
    release_streams(browser)
    wait_until_generated(browser, 2)
    wait(browser, lambda d: d.find_element(By.ID, "generate").is_enabled(), "Generate enabled")

    start_held(browser, 2)
    browser.find_element(By.ID, "sweep-run").click()  # replaces both running columns, and generates its own
    assert browser.execute_script("return window.__aborted") == 2
    release_streams(browser)
    wait_until_generated(browser, 4)
    assert browser.find_element(By.ID, "generate").is_enabled()


def test_one_output_mode_for_every_column_a_regex(demo, browser):
    open_ready(browser, demo)
    wait_until_generated(browser, 3)
    select(browser, "Output of column 1", "regex")
    regex = "(Arr|Hello), [a-z ]{1,20}\\."
    fill_element(browser.find_element(By.CSS_SELECTOR, 'input[aria-label="Regex of column 1"]'), regex)
    browser.find_element(By.CSS_SELECTOR, 'button[aria-label="Use column 1\'s output mode in every column"]').click()
    fill(browser, "max-tokens", "40")
    browser.find_element(By.ID, "generate").click()
    wait_until_generated(browser, 3)
    grammar = {"type": "regex", "value": regex}
    for column, adapters in zip(columns(browser), [[], ["pirate"], ["pirate", "british"]], strict=True):
        expected = generate(demo, adapters, DEMO_PROMPT, 40, grammar=grammar).json()["generated_text"]
        assert text_of(browser, column) == expected
        assert parsed_of(column) == ("valid", "Matches the regex.")
    note = columns(browser)[0].find_element(By.CLASS_NAME, "mode-note")
    assert note.text == "Every column uses this output mode now."
    select(browser, "Output of column 1", "text")  # no longer true
    assert note.text == ""


# --- over HTTP


def test_the_page_is_public_the_api_is_not(keyed):
    page = call(keyed, "GET", "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for path, media_type in (
        ("/playground/playground.js", "text/javascript"),
        ("/playground/playground.css", "text/css"),
    ):
        response = call(keyed, "GET", path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert f'"{path}"' in page.text

    redirect = call(keyed, "GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert redirect.status_code == 307 and redirect.headers["location"] == "/playground"
    assert call(keyed, "GET", "/").status_code == 401  # not a browser: as before
    assert call(keyed, "GET", "/playground/anything-else").status_code == 401
    body = {"inputs": DEMO_PROMPT, "parameters": {"max_new_tokens": 4}}
    assert call(keyed, "POST", "/", json=body, headers={"Accept": "text/html"}).status_code == 401
    tgi = call(keyed, "POST", "/", ADMIN, json=body, headers={"Accept": "text/html"})
    assert tgi.status_code == 200 and isinstance(tgi.json(), list)  # TGI's root route, untouched

    assert call(keyed, "GET", "/operator").status_code == 401
    forbidden = call(keyed, "GET", "/operator", ACME)
    assert forbidden.status_code == 403
    assert forbidden.json() == {"error": "/operator needs an API key without namespaces", "error_type": "forbidden"}
    assert call(keyed, "GET", "/operator", ADMIN).status_code == 200


def test_operator_reports_tiers_activity_and_rows(serve):
    server = serve(demo_settings(max_loaded_adapters=1))  # a second adapter evicts the first to host memory
    assert call(server, "POST", "/adapters/pirate/load").status_code == 200
    assert call(server, "POST", "/adapters/british/load").status_code == 200
    listed = {a["name"]: a for a in call(server, "GET", "/adapters").json()["adapters"]}
    body = {
        "inputs": DEMO_PROMPT,
        "adapters": ["british"],
        "parameters": {"max_new_tokens": 900, "ignore_eos_token": True},
    }
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=WAIT) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # the first token: the row is running
        report = call(server, "GET", "/operator").json()
    assert report["tiers"] == {
        "loaded": {"adapters": 1, "bytes": listed["british"]["bytes"]},
        "host": {"adapters": 1, "bytes": listed["pirate"]["bytes"]},
    }
    assert [(a["name"], a["state"]) for a in report["adapters"]] == [("british", "loaded"), ("pirate", "host")]
    activity = report["activity"]
    assert sum(i["loads"] for i in activity) == 2 and sum(i["evictions"] for i in activity) == 1
    assert sum(i["failed_loads"] for i in activity) == 0
    assert report["running"] == 1 and report["waiting"] == 0
    (row,) = report["rows"]
    assert row["state"] == "running" and row["adapters"] == "british" and row["generated_tokens"] >= 1


def test_the_wheel_ships_the_page(tmp_path):
    """A non-editable install serves the page: its files are package data."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "server", source / "server", ignore=shutil.ignore_patterns("__pycache__", "model"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source)]
    subprocess.run([*command, "-w", str(tmp_path)], check=True, capture_output=True, timeout=WAIT)
    (wheel,) = tmp_path.glob("mixserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"server/playground/{f}" for f in ("index.html", "playground.js", "playground.css")} <= names
