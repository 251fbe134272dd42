"""Make tests/ importable so test files can ``from clips import write_clip``."""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The feature cache of every test (and of the CLIs they start) lives in a folder of this run,
# never in the user's ~/.cache.
os.environ["DYCOKE_CACHE"] = tempfile.mkdtemp(prefix="dycoke-test-cache-")
# --device auto means the CPU in every test (and every CLI a test starts): tests written for the
# CPU stay there on a GPU machine. Tests marked gpu name cuda themselves (and see below).
os.environ["DYCOKE_DEVICE"] = "cpu"


import pytest  # noqa: E402

# Vocabulary of the tiny test models: every word the tests' questions and answers use.
TINY_WORDS = (
    "what color colour is the cup ball box in video which way does move moves stays still "
    "at start end describe a an and turns red green blue yellow purple white left right up down ?"
).split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 4-layer LLaVA-OneVision (SigLIP 2 layers, 32 px frames, 4 tokens per frame),
    saved with save_pretrained and loaded back by the tests through the real loader."""
    from dycoke_cli.testing.tiny import TinySpec, build_llava_onevision, build_word_tokenizer, save_checkpoint

    tok = build_word_tokenizer(TINY_WORDS)
    model = build_llava_onevision(tok, TinySpec(), seed=0)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("tiny") / "model",
                           dycoke_defaults={"num_frames": 8, "prune_layer": 2})


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from dycoke_cli.models.loader import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory):
    from clips import write_clip

    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", n_frames=30, size=(64, 48), fps=10)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available; elsewhere they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_tests_choose_freely(request, monkeypatch):
    """A test marked gpu runs with --device auto meaning what it means for a user."""
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.delenv("DYCOKE_DEVICE", raising=False)
