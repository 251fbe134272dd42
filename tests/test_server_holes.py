"""`dycoke serve` against what an attacker or an odd client sends: each hole found by trying is a
clear 4xx in OpenAI's error shape and the server keeps serving. A real server process on
127.0.0.1, the real openai client, raw HTTP where a client would not send it."""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_server import KEY, SAMPLES, UP_TO_A_HANG, Served, http, openai, video

ALLOWED_HOST = "dycoke.test"
RED = "a red cup moves left"  # the demo model on red_cup.mp4, "describe the video."
COLOR = "what color is the cup?"
GREEN = "a green ball moves up"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    shutil.copy(SAMPLES / "red_cup.mp4", folder / "red_cup.mp4")
    return folder


@pytest.fixture(scope="module")
def server(media, tmp_path_factory):
    srv = Served(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--allowed-local-media-path", str(media),
                 "--max-upload-mb", "1", "--allowed-host", ALLOWED_HOST)
    yield srv
    assert srv.stop() == 0
    assert srv.stderr().splitlines() == ["[dycoke] loading model...", f"[dycoke] serving demo at {srv.base} (Ctrl-C stops)",
                                       f"[dycoke] the page: {srv.root}/"]


def raw(server, method: str, path: str, body: bytes | None = None, headers: list[tuple[str, str]] | None = None):
    """(status, headers, body) of one request sent as given (repeated headers included)."""
    host, port = server.root.removeprefix("http://").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=UP_TO_A_HANG)
    try:
        conn.putrequest(method, path, skip_host=any(k.lower() == "host" for k, _ in headers or []))
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def describe(url: str) -> list[dict]:
    return video(url, "describe the video.")


def ask(server, messages, key: str | None = KEY, **fields) -> tuple[int, dict]:
    return http(f"{server.base}/chat/completions", {"model": "demo", "messages": messages, **fields}, key=key)


# -------------------------------------------------------------------------------- requests


@pytest.mark.parametrize("path", ["{media}/red\x00_cup.mp4", "{media}/red%00_cup.mp4", "/etc/pass%00wd"])
def test_a_nul_byte_in_a_file_url_is_a_400(server, media, path):
    code, body = ask(server, video("file://" + path.format(media=media)))
    assert (code, body["error"]["message"]) == (400, "malformed file:// URL: the path holds a NUL byte")


@pytest.mark.parametrize("where", ["question", "system", "assistant"])
def test_a_lone_surrogate_is_a_400(server, media, where):
    url = f"file://{media}/red_cup.mp4"
    messages = video(url, "what \ud800 color?" if where == "question" else "what color is the cup?")
    if where == "system":
        messages = [{"role": "system", "content": "be \ud800 brief"}, *messages]
    if where == "assistant":
        messages = [*messages, {"role": "assistant", "content": "red \ud800"}, {"role": "user", "content": "and?"}]
    index = {"question": 0, "system": 0, "assistant": 1}[where]
    code, body = ask(server, messages)
    assert (code, body["error"]["message"]) == (
        400, f"messages[{index}]: the text is not valid Unicode (it holds a lone UTF-16 surrogate)")


def test_an_empty_first_message_with_the_video_later_is_a_400(server, media):
    messages = [{"role": "user", "content": []}, {"role": "assistant", "content": "ok"},
                *video(f"file://{media}/red_cup.mp4")]
    code, body = ask(server, messages)
    assert (code, body["error"]["message"]) == (400, "the video must be in the first message, a user message")


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("response_format", {"type": "json_object"}),
])
def test_fields_asking_for_what_the_server_does_not_do_are_named(server, media, field, value):
    code, body = ask(server, video(f"file://{media}/red_cup.mp4"), **{field: value})
    assert (code, body["error"]["message"], body["error"]["code"]) == (
        400, f"{field} is not supported by this server", "unsupported_field")


def test_their_harmless_defaults_are_taken(server, media):
    code, body = ask(server, describe(f"file://{media}/red_cup.mp4"), tools=[], tool_choice="none", logprobs=False,
                     response_format={"type": "text"})
    assert (code, body["choices"][0]["message"]["content"]) == (200, RED)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "seed", "n", "temperature"])
def test_a_boolean_is_not_a_number(server, media, field):
    code, body = ask(server, video(f"file://{media}/red_cup.mp4"), **{field: True})
    assert (code, body["error"]["message"]) == (422, f"{field}: Value error, must be a number, not a boolean")


# -------------------------------------------------------------------------------- routes and headers


def test_models_retrieve_works_through_the_sdk(server):
    client = server.client()
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-4o")
    assert exc.value.body["message"] == "model 'gpt-4o' is not served here (this server serves 'demo')"


@pytest.mark.parametrize("method,path", [("GET", "/v1/models/"), ("POST", "/v1/chat/completions/"), ("GET", "/health/")])
def test_a_trailing_slash_is_never_redirected(server, method, path):
    status, headers, _ = raw(server, method, path, b"{}" if method == "POST" else None,
                             [("Authorization", f"Bearer {KEY}")])
    assert status == 404 and "location" not in {k.lower() for k in headers}


def test_a_wrong_method_says_what_is_allowed_and_head_health_answers(server):
    status, headers, body = raw(server, "POST", "/v1/models", b"{}", [("Authorization", f"Bearer {KEY}")])
    assert (status, headers.get("allow"), json.loads(body)["error"]["message"]) == (
        405, "GET", "Method Not Allowed: POST /v1/models")
    status, _, body = raw(server, "HEAD", "/health")
    assert (status, body) == (200, b"")


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("evil.example:8000", 403), ("127.0.0.1.nip.io", 403),
    ("localhost", 200), ("127.0.0.1:1234", 200), ("[::1]:80", 200), (ALLOWED_HOST, 200), ("DYCOKE.TEST:9", 200),
])
def test_the_host_header_must_name_this_server(server, host, status):
    code, _, body = raw(server, "GET", "/health", headers=[("Host", host)])
    assert code == status
    if status == 403:
        assert json.loads(body)["error"] == {
            "message": f"the Host header {host.split(':')[0]!r} does not name this server (--allowed-host adds names)",
            "type": "permission_error", "code": "host_not_allowed"}


def test_two_authorization_headers_are_refused(server):
    status, _, body = raw(server, "GET", "/v1/models", headers=[("Authorization", f"Bearer {KEY}"),
                                                                ("Authorization", "Bearer other")])
    assert (status, json.loads(body)["error"]["message"]) == (400, "more than one Authorization header")


@pytest.mark.parametrize("route,stream", [("chat", False), ("chat", True), ("models", False), ("model", False)])
def test_every_v1_route_and_both_stream_modes_need_the_key(server, media, route, stream):
    path = {"chat": "/v1/chat/completions", "models": "/v1/models", "model": "/v1/models/demo"}[route]
    body = json.dumps({"model": "demo", "stream": stream, "messages": video(f"file://{media}/red_cup.mp4")}).encode()
    status, _, reply = raw(server, "POST" if route == "chat" else "GET", path, body if route == "chat" else None,
                           [("Content-Type", "application/json")])
    assert (status, json.loads(reply)["error"]["message"]) == (401, "missing API key (send Authorization: Bearer <key>)")


def test_a_client_trickling_its_headers_is_disconnected(server):
    host, port = server.root.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=UP_TO_A_HANG) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        start = time.monotonic()
        assert sock.recv(1024) == b""  # the server closed the connection
        assert time.monotonic() - start < 60
    assert http(f"{server.root}/health", key=None)[0] == 200


def test_a_client_that_leaves_a_plain_request_leaves_no_trace_on_stderr(server, media):
    before = server.stderr()
    host, port = server.root.removeprefix("http://").split(":")
    body = json.dumps({"model": "demo", "max_tokens": 900, "temperature": 1.0, "seed": 1, "ignore_eos": True,
                       "messages": video(f"file://{media}/red_cup.mp4", "describe")}).encode()
    with socket.create_connection((host, int(port)), timeout=UP_TO_A_HANG) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + UP_TO_A_HANG
        while http(f"{server.root}/health", key=None)[1]["running"] is False and time.monotonic() < deadline:
            time.sleep(0.02)  # generating now
    deadline = time.monotonic() + UP_TO_A_HANG
    while http(f"{server.root}/health", key=None)[1]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the job was cancelled
    assert ask(server, describe(f"file://{media}/red_cup.mp4"))[1]["choices"][0]["message"]["content"] == RED
    assert server.stderr() == before


# -------------------------------------------------------------------------------- limits and keys


def test_a_data_url_one_byte_over_the_limit_is_a_413_and_one_at_it_is_read(server):
    limit = 2**20  # --max-upload-mb 1
    for size, status in ((limit + 1, 413), (limit, 400)):
        url = "data:video/mp4;base64," + base64.b64encode(b"\0" * size).decode()
        code, body = ask(server, video(url))
        assert code == status, body
    assert body["error"]["message"].startswith("the data: URL: ")  # read, and not a video


@pytest.mark.parametrize("change", [{"method": "none"}, {"prune_p": 0.5}, {"selection": "topk"}])
def test_a_follow_up_with_other_compression_settings_starts_its_own_session(server, media, change):
    client = server.client()
    url = f"file://{media}/red_cup.mp4"
    first = client.chat.completions.create(model="demo", messages=video(url, "what color is the cup?"),
                                           extra_body={"dycoke": {"prune_p": 0.6}})
    turns = [*video(url, "what color is the cup?"), {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "which way does the cup move?"}]
    same = client.chat.completions.create(model="demo", messages=turns, extra_body={"dycoke": {"prune_p": 0.6}})
    assert same.model_extra["dycoke"]["reused"] is True
    other = client.chat.completions.create(model="demo", messages=turns,
                                           extra_body={"dycoke": {"prune_p": 0.6, **change}})
    assert other.model_extra["dycoke"]["reused"] is False
    options = other.model_extra["dycoke"]["options"]
    assert {k: options[k] for k in change} == change


def test_frames_by_length_round_a_clip_of_2_8_seconds_to_6(tmp_path):
    """The demo model's dycoke.json: 2 fps within [4, 16], round(seconds * fps). 2.8 s -> 5.6 -> 6
    (every sample clip's length times 2 is a whole number, so only such a clip tells round from floor)."""
    from clips import write_clip

    clip = write_clip(tmp_path / "clip.mp4", n_frames=28, size=(64, 48), fps=10)
    proc = subprocess.run([sys.executable, "-m", "dycoke_cli", "ask", str(clip), "what color is the cup?", "--model",
                           "demo", "--json", "--no-cache"], capture_output=True, text=True, timeout=UP_TO_A_HANG)
    assert (proc.returncode, proc.stderr) == (0, "")
    reply = json.loads(proc.stdout)
    assert (reply["video"]["duration"], reply["options"]["frames"], reply["video"]["sampled"]) == (2.8, 6, 6)


# -------------------------------------------------------------------------------- the swap race


SWAPPER = """
import os, sys, time
name, inside, outside, stop = sys.argv[1:5]
tmp = name + ".tmp"
while not os.path.exists(stop):
    for make in (lambda: os.link(inside, tmp), lambda: os.symlink(outside, tmp)):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        make()
        os.replace(tmp, name)
"""


@pytest.mark.timing
def test_a_name_swapped_to_an_outside_clip_is_never_read(tmp_path):
    """The attack: write access inside the allowed folder, one name swapped as fast as possible
    between a hard link to an allowed clip and a symlink to a clip outside, while 200 requests
    ask about that name. No answer is about the outside clip, every failure is a 4xx, and the
    feature cache holds the allowed clip's features only. The question's one-token answer tells
    the clips apart ("red" inside, "green" outside, checked below) at a fifth of a caption's cost."""
    folder, outside, cache = tmp_path / "media", tmp_path / "outside", tmp_path / "cache"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(SAMPLES / "red_cup.mp4", folder / "red_cup.mp4")
    shutil.copy(SAMPLES / "green_ball_up.mp4", outside / "secret.mp4")
    swap, stop = folder / "swap.mp4", tmp_path / "stop"
    os.link(folder / "red_cup.mp4", swap)
    env = {**os.environ, "DYCOKE_CACHE": str(cache)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYCOKE_CACHE", str(cache))
        srv = Served(tmp_path, "--allowed-local-media-path", str(folder), "--queue", "64")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(swap), str(folder / "red_cup.mp4"),
                                str(outside / "secret.mp4"), str(stop)])
    try:
        def one(_):
            return ask(srv, video(f"file://{swap}", COLOR), max_tokens=1, key=None)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(200)))
    finally:
        stop.touch()
        swapper.wait(UP_TO_A_HANG)
        assert srv.stop() == 0
    answers = [body["choices"][0]["message"]["content"] for code, body in results if code == 200]
    failures = [(code, body["error"]["message"]) for code, body in results if code != 200]
    assert set(answers) <= {"red"} and answers, (set(answers), failures[:3])
    assert [f for f in failures if not 400 <= f[0] < 500] == [], srv.stderr()
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) == 1  # one clip was ever decoded: the allowed one
    def cli(clip: Path, *flags: str) -> tuple:
        run = subprocess.run([sys.executable, "-m", "dycoke_cli", "ask", str(clip), COLOR, "--model", "demo", "-q",
                              "--max-new-tokens", "1", *flags], capture_output=True, text=True, env=env,
                             timeout=UP_TO_A_HANG)
        return run.returncode, run.stdout, run.stderr

    assert cli(outside / "secret.mp4", "--no-cache") == (0, "green\n", "")  # the outside clip's answer differs
    assert cli(folder / "red_cup.mp4") == (0, "red\n", "")
    assert len(sorted(cache.rglob("*.safetensors"))) == 1  # a hit: the same entry
    print(f"\n[swap race] {len(answers)} answers (all about the allowed clip), {len(failures)} refused "
          f"({sorted(set(c for c, _ in failures))})")


def test_one_request_hashes_its_clip_once(media, tmp_path, monkeypatch):
    """The server hashes the open file once (media.py); the feature cache's key is that digest,
    not a second read of the file. Counted on the real calls, in process."""
    from dycoke_cli import load_model
    from dycoke_cli import encoder  # where the feature cache's key is made
    from dycoke_cli.feature_cache import FeatureCache
    from dycoke_cli.server import media as media_module
    from dycoke_cli.server.protocol import ChatRequest
    from dycoke_cli.server.service import Server, ServerConfig

    calls = {"fd": 0, "file": 0}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(media_module, "_digest_fd", counted("fd", media_module._digest_fd))
    monkeypatch.setattr(encoder, "file_digest", counted("file", encoder.file_digest))
    server = Server(load_model("demo"), ServerConfig(allowed_media=media, cache=FeatureCache(tmp_path / "cache")))
    body = ChatRequest.model_validate({"model": "demo", "messages": describe(f"file://{media}/red_cup.mp4")})
    plan = server.plan(body)
    video = server.policy.open(plan.url)
    try:
        texts = [e.text for e in server.work(plan, video) if type(e).__name__ == "Token"]
    finally:
        video.close()
    assert "".join(texts).strip() == RED
    assert calls == {"fd": 1, "file": 0}
