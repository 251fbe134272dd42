"""scripts/pick_torch.py, the choice scripts/setup.sh makes: run as setup runs it, against a real
HTTP index on 127.0.0.1 that answers and a port where nothing listens."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pick_torch.py"
NEWEST = "2.15.0"  # requirements/torch.txt


def pick(*args: str, path: Path, **env):
    """(exit code, stdout, stderr) of the script, with PATH limited to ``path``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("DYCOKE_CPU_TORCH", "DYCOKE_TORCH_CPU_INDEX")}
    environ.update(PATH=str(path), **env)
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environ,
                          timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def index():
    """A PEP 503 index on 127.0.0.1 with a page for torch."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = b"<html><body><a href='torch-2.15.0+cpu.whl'>torch</a></body></html>"
            self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cpu_machine_gets_the_cpu_build_from_pytorchs_index(index, tmp_path):
    code, out, err = pick("", path=tmp_path, DYCOKE_TORCH_CPU_INDEX=index)
    assert (code, out) == (0, f"torch=={NEWEST} --index-url {index}\n")
    assert err == (f"setup: installing torch {NEWEST}+cpu, the newest tested (CPU build), from PyTorch's CPU index "
                   f"({index}): no GPU was found (or DYCOKE_CPU_TORCH is set)\n")


def test_an_unreachable_cpu_index_falls_back_to_the_default_index_and_says_so(tmp_path):
    index = f"http://127.0.0.1:{closed_port()}/whl/cpu"
    code, out, err = pick("", path=tmp_path, DYCOKE_TORCH_CPU_INDEX=index)
    assert (code, out) == (0, f"torch=={NEWEST}\n")
    assert err.startswith(f"setup: PyTorch's CPU index ({index}) cannot be reached; installing torch {NEWEST}, "
                          "the newest tested, from the default index instead. On Linux that is a CUDA build")


def test_a_gpu_machine_gets_the_default_build_unless_the_cpu_one_is_asked_for(index, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    code, out, err = pick("", path=tmp_path, DYCOKE_TORCH_CPU_INDEX=index)
    assert (code, out) == (0, f"torch=={NEWEST}\n") and "an NVIDIA GPU is present" in err
    code, out, _ = pick("", path=tmp_path, DYCOKE_TORCH_CPU_INDEX=index, DYCOKE_CPU_TORCH="1")
    assert (code, out) == (0, f"torch=={NEWEST} --index-url {index}\n")


def test_a_torch_in_range_is_kept_and_one_outside_is_never_replaced(tmp_path):
    assert pick("2.13.0+cpu", path=tmp_path) == (
        0, "\n", "setup: keeping torch 2.13.0+cpu (within the tested range >=2.13,<2.16)\n")
    code, out, err = pick("2.16.0+cu130", path=tmp_path)
    assert (code, out) == (1, "\n")
    assert err.startswith("setup: this venv has torch 2.16.0+cu130, newer than the newest tested (tested: "
                          ">=2.13,<2.16); setup stops rather than replace it. To use a tested build: "
                          f".venv/bin/pip install 'torch=={NEWEST}'")
    code, _, err = pick("2.11.0+cu130", path=tmp_path)
    assert code == 1 and "older than the oldest supported" in err


def test_the_oldest_release_can_be_asked_for(index, tmp_path):
    code, out, err = pick("", "2.13.0", path=tmp_path, DYCOKE_TORCH_CPU_INDEX=index)
    assert (code, out) == (0, f"torch==2.13.0 --index-url {index}\n")
    assert err.startswith("setup: installing torch 2.13.0+cpu, the release asked for (CPU build), from")
