"""Find a checkpoint (``demo``, a folder, or a hub id in the local cache), check it without
reading tensor data, pick the device and dtype, and load it through its family's adapter."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelError, UsageError
from .base import LoadedModel, ModelDefaults, read_frame_spec
from .checkpoint import (
    PICKLE_FILE,
    PICKLE_INDEX,
    SAFE_FILE,
    SAFE_INDEX,
    WeightFiles,
    check_aux_files,
    check_config_values,
    check_pickle,
    check_safetensors,
    find_weights,
    read_json,
)
from .registry import families

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DEMO_MODEL = "demo"

# Files whose presence says "this folder holds weights".
SAFETENSORS_GLOBS = ("*.safetensors",)
PICKLE_GLOBS = ("pytorch_model*.bin", "*.pt", "*.pth")
# What to fetch of a hub repo (weights, configs, tokenizer, templates); never code.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def demo_model_path() -> Path:
    return Path(__file__).resolve().parents[1] / "demo_model"


def resolve_model(name: str) -> Path:
    """Map a model argument to a local folder: ``demo``, a folder, or a hub id in the HF cache."""
    if name == DEMO_MODEL:
        path = demo_model_path()
        if not (path / "config.json").is_file():
            raise ModelError("the built-in demo model is not installed with this copy of dycoke-cli")
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{name}: not a model folder (it is a file)")
        return path
    # A hub id is "owner/name": one slash, no leading "./", "/" or "~".
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or "\\" in name:
        raise ModelError(f"{name}: model folder not found")
    return _resolve_hub_id(name)


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    fetch = f"fetch it first with `hf download {repo_id}` (or pass a local folder with --model)"
    if offline:
        raise ModelError(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; {fetch}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{repo_id}: could not download ({reason}); {fetch}") from None


def check_folder(folder: Path, allow_pickle: bool) -> dict:
    """Validate a checkpoint folder before anything heavy; return its config.json as a dict.

    Reads config.json, dycoke.json, the tokenizer / template / preprocessor files, the
    safetensors headers and any shard index; never the tensor data, and never writes to the
    folder. Pickle weights (only with ``allow_pickle``) are opened with torch's safe loader on
    the meta device: the pickle is checked, its tensors are not read.
    """
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: not a model folder (no config.json)")
    cfg = read_json(cfg_path, "config")
    model_type = cfg.get("model_type")
    known = families()
    if not isinstance(model_type, str) or model_type not in known:
        raise ModelError(
            f"{folder}: unsupported model type {model_type!r} (supported: {', '.join(sorted(known))})"
        )
    check_config_values(cfg_path, cfg)
    check_weight_files(folder, allow_pickle)
    check_aux_files(folder)
    read_frame_spec(folder, 1)  # the size a preprocessor file may leave out does not matter here
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    ModelDefaults.from_folder(folder, layers if isinstance(layers, int) else None)
    return cfg


def check_weight_files(folder: Path, allow_pickle: bool) -> WeightFiles:
    """The weight files transformers will load, each checked: a safetensors header, or a pickle
    opened by torch's safe loader on the meta device (this imports torch)."""
    has_safe = any(any(folder.glob(g)) for g in SAFETENSORS_GLOBS)
    has_pickle = any(any(folder.glob(g)) for g in PICKLE_GLOBS)
    if not has_safe and not has_pickle:
        raise ModelError(f"{folder}: no weights found (expected *.safetensors)")
    if not has_safe and not allow_pickle:
        raise ModelError(f"{folder}: only pickle weights (.bin); pass --allow-pickle to load them")
    weights = find_weights(folder, allow_pickle)
    if weights is None:
        names = [SAFE_FILE, SAFE_INDEX] + ([PICKLE_FILE, PICKLE_INDEX] if allow_pickle else [])
        raise ModelError(f"{folder}: no {', '.join(names[:-1])} or {names[-1]}")
    for path in weights.files:
        if weights.safetensors:
            check_safetensors(path)
        else:
            check_pickle(path)
    return weights


def locate_model(name: str, allow_pickle: bool = False) -> tuple[Path, dict]:
    """Find and check a checkpoint without loading it (cheap: see ``check_folder``)."""
    folder = resolve_model(name)
    return folder, check_folder(folder, allow_pickle)


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls are fast on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def auto_device(device: str, environ=os.environ) -> str:
    """``auto`` made what $DYCOKE_DEVICE says (cpu, cuda or auto), where it is set; any other
    choice as given. The test suite sets it to cpu, so tests meant for the CPU stay there on a
    machine with a GPU."""
    if device != "auto":
        return device
    chosen = environ.get("DYCOKE_DEVICE", "").strip() or "auto"
    if chosen not in ("auto", "cpu", "cuda"):
        raise UsageError(f"DYCOKE_DEVICE must be auto, cpu or cuda (got {chosen!r})")
    return chosen


def pick_device(device: str):
    import torch

    device = auto_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (this torch build: "
                         f"{torch.__version__})")
    return torch.device(device)


def pick_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(name: str, *, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False) -> LoadedModel:
    """Resolve, validate and load a video LLM. Raises ModelError / UsageError."""
    folder, cfg = locate_model(name, allow_pickle)
    dev = pick_device(device)
    adapter = families()[cfg["model_type"]]
    return adapter.load(name, folder, dev, pick_dtype(dtype, dev), allow_pickle)
