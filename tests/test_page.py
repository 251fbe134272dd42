"""The page's server side: ``/`` and its files with their Content-Security-Policy, ``GET /v1/clips``,
``file:NAME`` URLs and a request's ``dycoke.kept``; a real `dycoke serve --model demo` on
127.0.0.1 (the browser drives the page in test_page_browser.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest
from test_server import KEY, SAMPLES, UP_TO_A_HANG, Served, http, video

from dycoke_cli.server.page import CSP, list_clips

CLIPS = ["Clip Two.MKV", "blue_cup_turns_yellow.mp4", "red_cup.mp4"]
QUESTION = "describe the video."


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two sample clips and one renamed, beside what the list must leave out."""
    folder = tmp_path_factory.mktemp("media")
    for name in ("red_cup.mp4", "blue_cup_turns_yellow.mp4"):
        shutil.copy(SAMPLES / name, folder / name)
    shutil.copy(SAMPLES / "red_cup.mp4", folder / "Clip Two.MKV")
    shutil.copy(SAMPLES / "red_cup.mp4", folder / ".hidden.mp4")
    (folder / "notes.txt").write_text("not a video\n")
    (folder / "sub").mkdir()
    shutil.copy(SAMPLES / "red_cup.mp4", folder / "sub" / "inner.mp4")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(SAMPLES / "red_cup.mp4", outside / "secret.mp4")
    (folder / "link_out.mp4").symlink_to(outside / "secret.mp4")
    (folder / "link_in.mp4").symlink_to(folder / "red_cup.mp4")
    os.mkfifo(folder / "fifo.mp4")
    return folder


@pytest.fixture(scope="module")
def server(media, tmp_path_factory):
    srv = Served(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--allowed-local-media-path", str(media))
    yield srv
    assert srv.stop() == 0


def get(url: str, key: str | None = None):
    """(status, headers, body bytes) of a GET, errors included."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=UP_TO_A_HANG) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_the_page_is_served_without_a_key_and_allows_only_this_server(server):
    status, headers, body = get(f"{server.root}/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == CSP
    assert "default-src 'none'" in CSP and "connect-src 'self'" in CSP and "script-src 'self'" in CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    # every file the page names is the server's own
    assert sorted(re.findall(r'(?:src|href)="([^"]+)"', body.decode())) == [
        "/static/app.js", "/static/icon.svg", "/static/style.css"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        status, headers, _ = get(f"{server.root}/static/{name}")
        assert (status, headers["Content-Type"].split(";")[0]) == (200, kind)
        assert headers["Content-Security-Policy"] == CSP
    status, _, body = get(f"{server.root}/static/page.py")
    assert status == 404
    assert json.loads(body) == {"error": {"message": "not found: GET /static/page.py", "type": "not_found_error",
                                          "code": "not_found"}}


def test_the_script_fetches_only_relative_paths():
    script = (SAMPLES.parent / "src" / "dycoke_cli" / "server" / "static" / "app.js").read_text()
    assert not re.search(r"https?://", script)
    assert sorted(set(re.findall(r'(?:api|fetch)\("([^"]+)"', script))) == ["/v1/chat/completions", "/v1/clips",
                                                                            "/v1/models"]


def test_clips_lists_names_only_behind_the_key(server):
    assert get(f"{server.base}/clips")[0] == 401
    status, _, body = get(f"{server.base}/clips", "wrong")
    assert (status, json.loads(body)["error"]["message"]) == (401, "invalid API key")
    status, _, body = get(f"{server.base}/clips", KEY)
    assert status == 200
    assert json.loads(body) == {"object": "list", "data": [{"object": "clip", "name": n} for n in CLIPS]}


def test_no_folder_no_clip():
    assert list_clips(None) == []


def test_a_clip_by_name_answers_as_its_file_url(server, media):
    by_url = http(f"{server.base}/chat/completions", {"model": "demo", "messages": video(
        f"file://{media}/red_cup.mp4", QUESTION)})
    by_name = http(f"{server.base}/chat/completions", {"model": "demo", "messages": video(
        "file:Clip%20Two.MKV", QUESTION)})
    assert by_url[0] == by_name[0] == 200
    assert by_name[1]["choices"][0]["message"]["content"] == by_url[1]["choices"][0]["message"]["content"]
    assert by_name[1]["dycoke"]["video"]["path"] == "file:Clip%20Two.MKV"  # as sent: no server path
    assert "kept" not in by_name[1]["dycoke"]  # not asked for


@pytest.mark.parametrize("url,message", [
    ("file:link_out.mp4", "the file:// URL points outside the allowed media folder"),
    ("file:missing.mp4", "file:missing.mp4: no such file"),
    ("file:sub%2Finner.mp4", "malformed file:// URL: expected file:///absolute/path (or file:NAME, a clip "
                             "directly in the allowed folder)"),
    ("file:..", "malformed file:// URL: expected file:///absolute/path (or file:NAME, a clip directly in the "
                "allowed folder)"),
    ("file:fifo.mp4", "file:fifo.mp4: not a regular file"),
])
def test_a_clip_name_that_is_not_a_clip_in_the_folder_is_refused(server, media, url, message):
    status, body = http(f"{server.base}/chat/completions", {"model": "demo", "messages": video(url)})
    assert (status, body["error"]["message"]) == (400, message)
    assert str(media) not in json.dumps(body)


def test_dycoke_kept_is_what_the_cli_json_says(server, media):
    clip = media / "blue_cup_turns_yellow.mp4"
    cli = subprocess.run([sys.executable, "-m", "dycoke_cli", "ask", str(clip), QUESTION, "--model", "demo", "--json"],
                         capture_output=True, text=True, timeout=UP_TO_A_HANG, check=True)
    expected = json.loads(cli.stdout)
    body = {"model": "demo", "messages": video("file:blue_cup_turns_yellow.mp4", QUESTION), "dycoke": {"kept": True}}
    status, plain = http(f"{server.base}/chat/completions", body)
    assert status == 200
    assert plain["choices"][0]["message"]["content"] == expected["answer"]
    assert plain["dycoke"]["kept"] == expected["kept"]
    stream = server.client().chat.completions.create(model="demo", stream=True, messages=body["messages"],
                                                    extra_body={"dycoke": {"kept": True}})
    last = [chunk for chunk in stream][-1]
    assert last.model_extra["dycoke"]["kept"] == expected["kept"]
    assert last.model_extra["dycoke"]["reused"] is True


def test_dycoke_kept_must_be_a_boolean(server):
    status, body = http(f"{server.base}/chat/completions", {"model": "demo", "messages": video("file:red_cup.mp4"),
                                                           "dycoke": {"kept": 1}})
    assert (status, body["error"]["message"]) == (422, "dycoke.kept: Input should be a valid boolean")
