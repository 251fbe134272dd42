"""The page of `dycoke serve` in a real browser: the operating system's headless Chromium, driven by
Playwright, against a real `dycoke serve --model demo` on 127.0.0.1 with an API key.

Without Chromium (``/usr/bin/chromium``, or ``$DYCOKE_CHROMIUM``) or Playwright these tests skip
and say why; with ``DYCOKE_BROWSER_TESTS=required`` (CI, .ci/run) a missing browser fails them.
Every request the browser makes is recorded: none may leave the server. Waits poll the page
with a deadline; nothing sleeps. The screenshot goes to ``$DYCOKE_ARTIFACTS`` (else the test's
temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import KEY, SAMPLES, UP_TO_A_HANG, Served

CHROMIUM = os.environ.get("DYCOKE_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("DYCOKE_BROWSER_TESTS") == "required"
CLIP = "blue_cup_turns_yellow.mp4"
QUESTION = "describe the video."
FOLLOW_UP = "what color is the cup?"
WAIT_MS = UP_TO_A_HANG * 1000


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DYCOKE_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"DYCOKE_BROWSER_TESTS=required, but {missing}", pytrace=False)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    for name in (CLIP, "red_cup.mp4"):
        shutil.copy(SAMPLES / name, folder / name)
    srv = Served(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--allowed-local-media-path", str(folder),
                 "--max-upload-mb", "1")
    srv.folder = folder
    yield srv
    assert srv.stop() == 0


def cli_answer(clip: Path, question: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dycoke_cli", "ask", str(clip), question, "--model", "demo", "--json",
                           *args], capture_output=True, text=True, timeout=UP_TO_A_HANG, check=True)
    return json.loads(proc.stdout)


class Page:
    """One tab on the server's page, every request it makes recorded."""

    def __init__(self, browser, server, width: int = 1280, height: int = 800):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.set_default_timeout(WAIT_MS)
        self.page.goto(f"{server.root}/")

    def log_in(self, key: str = KEY) -> None:
        self.page.fill("#key", key)
        self.page.press("#key", "Enter")

    def wait(self, script: str, arg=None):
        """Poll a function of the page until it returns a truthy value (the deadline: WAIT_MS)."""
        return self.page.wait_for_function(script, arg=arg, timeout=WAIT_MS).json_value()

    def answered(self, turns: int) -> None:
        """Wait until every column shows ``turns`` answers and the page is ready again."""
        self.wait("""n => !document.querySelector('#ask').disabled && [...document.querySelectorAll('.column')]
                    .every(c => c.querySelectorAll('.turns .a').length === n)""", turns)

    def ask(self, question: str, turns: int) -> None:
        self.page.fill("#question", question)
        self.page.press("#question", "Enter")
        self.answered(turns)

    def texts(self, selector: str) -> list[str]:
        return [e.inner_text() for e in self.page.query_selector_all(selector)]

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def tab(browser, server):
    page = Page(browser, server)
    yield page
    outside = [url for url in page.requests if not url.startswith(f"{server.root}/")]
    page.close()
    assert outside == []  # the page fetched nothing from anywhere but the server


def pick(tab: Page, clip: str = CLIP) -> None:
    tab.log_in()
    tab.wait("() => document.querySelectorAll('#clip option').length > 1")
    tab.page.select_option("#clip", clip)


def test_a_picked_clip_streams_the_cli_answer_and_draws_what_was_kept(tab, server):
    expected = cli_answer(server.folder / CLIP, QUESTION)
    pick(tab)
    # every state the answer went through while it streamed
    tab.page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const a = document.querySelector('.turns .a'); if (a) window.seen.push(a.textContent); })
        .observe(document.querySelector('#columns'), {subtree: true, childList: true, characterData: true}); }""")
    tab.ask(QUESTION, 1)
    assert tab.texts(".turns .a") == [expected["answer"]]
    seen = [s for s in tab.page.evaluate("() => window.seen") if s]
    # it grew piece by piece: the page showed each streamed delta as it came (how many of those
    # states a MutationObserver sees depends on how the network batched them), every state a
    # beginning of the answer
    assert int(tab.page.get_attribute(".turns .a", "data-deltas")) >= 3
    assert seen and all(expected["answer"].startswith(s) for s in seen)
    cells = tab.page.query_selector_all(".column .cell")
    assert len(cells) == expected["stats"]["frames"] == 6  # one cell per frame
    assert [int(c.get_attribute("data-kept")) for c in cells] == expected["kept"]["kept"]
    colours = tab.page.evaluate("""() => [...document.querySelectorAll('.column canvas')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < d.length; i += 4) seen.add(d.slice(i, i + 4).join());
        return seen.size; })""")
    assert len(colours) == 7 and min(colours) >= 2  # six cells and the heatmap, none blank


def test_a_follow_up_reuses_the_session(tab, server):
    pick(tab)
    tab.ask(QUESTION, 1)
    tab.ask(FOLLOW_UP, 2)
    answers = tab.texts(".turns .a")
    assert len(answers) == 2 and answers[1] != ""
    assert tab.texts('[data-stat="session reused"]') == ["yes"]
    assert tab.page.input_value("#question") == ""


def test_side_by_side_shows_none_and_dycoke(tab, server, tmp_path):
    none = cli_answer(server.folder / CLIP, QUESTION, "--method", "none")["answer"]
    dycoke = cli_answer(server.folder / CLIP, QUESTION)["answer"]
    pick(tab)
    tab.page.check("#side")
    tab.ask(QUESTION, 1)
    assert tab.texts(".column .method") == ["none", "dycoke"]
    assert tab.texts(".turns .a") == [none, dycoke]
    assert [len(tab.page.query_selector_all(f".column:nth-child({i}) .cell")) for i in (1, 2)] == [6, 6]
    artifacts = Path(os.environ.get("DYCOKE_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "page.png"
    tab.page.screenshot(path=str(shot), full_page=True)
    from PIL import Image

    assert Image.open(shot).size[0] == 1280


def test_a_wrong_api_key_shows_the_401_message(tab):
    tab.wait("() => !document.querySelector('#key-form').hidden")
    assert tab.page.inner_text("#model") == "this server needs an API key"
    tab.log_in("wrong-key")
    tab.wait("() => document.querySelector('#error').textContent !== ''")
    assert tab.page.inner_text("#error") == "invalid API key"
    assert tab.page.is_visible("#key-form")


def test_a_dropped_text_file_shows_the_servers_reason(tab):
    tab.log_in()
    tab.wait("() => document.querySelectorAll('#clip option').length > 1")
    drop = tab.page.evaluate_handle("""() => { const t = new DataTransfer();
        t.items.add(new File(['not a video\\n'], 'notes.txt', {type: 'text/plain'})); return t; }""")
    tab.page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
    tab.wait("() => document.querySelector('#dropped').textContent === 'using notes.txt'")
    tab.page.fill("#question", QUESTION)
    tab.page.press("#question", "Enter")
    tab.wait("() => document.querySelector('#error').textContent !== ''")
    assert tab.page.inner_text("#error") == "malformed data: URL: expected data:video/<type>;base64,<data>"


def test_the_policy_stops_an_outside_fetch(tab, server):
    tab.log_in()
    tab.wait("() => document.querySelectorAll('#clip option').length > 1")
    refused = tab.page.evaluate("""() => fetch('http://192.0.2.1/x').then(() => 'fetched', e => e.name)""")
    assert refused == "TypeError"
    assert any("Content Security Policy" in line for line in tab.console)
    # what the page loaded: itself, its files, and the /v1 routes
    paths = sorted({url.removeprefix(server.root) for url in tab.requests})
    assert paths == ["/", "/static/app.js", "/static/icon.svg", "/static/style.css", "/v1/clips", "/v1/models"]


def tab_to(page: Page, element: str) -> bool:
    """Press Tab until ``element`` (an id) has the focus; False when 20 presses do not reach it."""
    for _ in range(20):
        page.page.keyboard.press("Tab")
        if page.page.evaluate("() => document.activeElement.id") == element:
            return True
    return False


def test_keyboard_alone_at_1280_and_in_a_narrow_window(browser, server):
    for width in (1280, 380):
        page = Page(browser, server, width=width, height=800)
        keys = page.page.keyboard
        page.wait("() => document.activeElement === document.querySelector('#key')")
        keys.type(KEY)
        keys.press("Enter")
        page.wait("() => document.querySelectorAll('#clip option').length > 1")
        assert tab_to(page, "clip")
        keys.press("ArrowDown")  # the first clip
        assert tab_to(page, "question")
        keys.type(FOLLOW_UP)
        keys.press("Enter")
        page.answered(1)
        assert page.texts(".turns .a")[0] != ""
        assert page.texts(".column .method") == ["dycoke (the server's default)"]
        # nothing wider than the window
        assert page.page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        page.close()
