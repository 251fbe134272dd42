"""The model families, by ``model_type``: one adapter per family module. Adding a family means
writing its module beside the others and listing its adapter here; nothing else changes."""

from __future__ import annotations

from .base import FamilyAdapter
from .llava_onevision import LlavaOneVisionAdapter
from .qwen2_5_vl import Qwen25VLAdapter
from .qwen3_5 import Qwen35Adapter, Qwen35MoeAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (LlavaOneVisionAdapter(), Qwen25VLAdapter(), Qwen3VLAdapter(),
                                       Qwen3VLMoeAdapter(), Qwen35Adapter(), Qwen35MoeAdapter())


def families() -> dict[str, FamilyAdapter]:
    """model_type -> adapter."""
    return {a.model_type: a for a in ADAPTERS}
