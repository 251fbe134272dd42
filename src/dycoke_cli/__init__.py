"""dycoke-cli: ask questions about videos with a video LLM, made fast by DyCoke.

The Python API (torch and transformers are imported on first use)::

    from dycoke_cli import load_model, ask, CompressionOptions, SamplingOptions
    lm = load_model("demo")
    result = ask(lm, "clip.mp4", "what color is the cup?")
    print(result.text, result.stats.overall_retention)

    session = Session(lm, "clip.mp4")        # many questions, the clip encoded once
    session.ask("what color is the cup?")
"""

__version__ = "0.1.0"

_API = {
    "load_model": "models.loader",
    "ask": "session",
    "run": "session",
    "Session": "session",
    "answer": "pipeline",
    "encode_video": "pipeline",
    "CompressionOptions": "options",
    "SamplingOptions": "options",
    "Method": "options",
    "Answer": "results",
    "temporal_merge": "compression.ttm",
    "DecodeSelector": "compression.selectors",
    "PrunedKVCache": "compression.cache",
    "read_video": "video.read",
    "compare": "evaluation.compare",
    "evaluate": "evaluation.qa",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'dycoke_cli' has no attribute {name!r}")
