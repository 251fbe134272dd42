"""dycoke-cli: ask questions about videos with a video LLM, made fast by DyCoke."""

__version__ = "0.1.0"
