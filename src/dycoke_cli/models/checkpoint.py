"""Checks of a checkpoint folder's files, cheap enough to run before anything is loaded.

Each check reads only what it needs (a safetensors header, a shard index, the small JSON files;
a pickle through torch's safe loader on the meta device) and raises ``ModelError`` with one
line that names the file and the problem. Nothing here writes to the folder.

``check_loading_info`` runs after loading: it refuses weights whose tensor names or shapes do
not match the config, judged by transformers' own loading report (so the key renames
transformers performs and tied weights are not counted against a checkpoint).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

# The weight layouts transformers loads from a local folder, in its order of preference.
SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# The safetensors library refuses headers larger than this (bytes).
SAFETENSORS_MAX_HEADER = 100_000_000
# Bits per element of every dtype the safetensors format defines.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# config.json values that must be positive integers when present (absent: transformers' default).
CONFIG_POSITIVE_INTS = {
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "image_size", "patch_size", "num_channels"),
}
CONFIG_TOKEN_IDS = ("image_token_index", "video_token_index")

# Other JSON files transformers reads from a checkpoint folder, and what each holds.
AUX_JSON_FILES = {
    "generation_config.json": "generation config",
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer config",
    "special_tokens_map.json": "tokenizer config",
    "added_tokens.json": "tokenizer config",
    "chat_template.json": "chat template",
    "processor_config.json": "processor config",
    "preprocessor_config.json": "preprocessor config",
    "video_preprocessor_config.json": "preprocessor config",
}
TEXT_FILES = {"chat_template.jinja": "chat template"}


@dataclass(frozen=True)
class WeightFiles:
    """The weight files transformers will read, and the file errors about them name."""

    files: tuple[Path, ...]
    safetensors: bool
    label: Path  # the single weights file, or the index of a sharded checkpoint


def find_weights(folder: Path, allow_pickle: bool) -> WeightFiles | None:
    """The layout ``from_pretrained`` picks (safetensors first; pickle only if allowed), or None."""
    layouts = [(SAFE_FILE, False, True), (SAFE_INDEX, True, True)]
    if allow_pickle:
        layouts += [(PICKLE_FILE, False, False), (PICKLE_INDEX, True, False)]
    for name, sharded, safe in layouts:
        path = folder / name
        if path.is_file():
            files = shard_files(path) if sharded else (path,)
            return WeightFiles(files, safe, path)
    return None


def shard_files(index: Path) -> tuple[Path, ...]:
    """The shards a ``*.index.json`` names; each must be a file inside the folder."""
    data = read_json(index, "index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: no weight_map (a JSON object of tensor name -> shard file)")
    if not all(isinstance(n, str) and n for n in weight_map.values()):
        raise ModelError(f"{index}: weight_map values must be shard file names")
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        raise ModelError(f"{index}: names a shard outside the folder ({outside[0]!r})")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if len(missing) == 1:
        raise ModelError(f"{index}: names a missing shard {missing[0]!r}")
    if missing:
        raise ModelError(f"{index}: names {len(missing)} missing shards (e.g. {missing[0]!r})")
    return tuple(index.parent / n for n in names)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or ModelError naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path}: unreadable {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: unreadable {what} (invalid JSON: {exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno})") from None
    except (OSError, RecursionError) as exc:
        raise ModelError(f"{path}: unreadable {what} ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: unreadable {what} (a JSON {_json_kind(data)}, not an object)")
    return data


def check_aux_files(folder: Path) -> None:
    """The tokenizer, template and preprocessor files that are present parse (JSON objects,
    UTF-8 text), so that a broken one is named rather than failing deep inside transformers."""
    for name, what in AUX_JSON_FILES.items():
        if (folder / name).is_file():
            read_json(folder / name, what)
    for name, what in TEXT_FILES.items():
        path = folder / name
        if path.is_file():
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise ModelError(f"{path}: unreadable {what} (not UTF-8 text)") from None
            except OSError as exc:
                raise ModelError(f"{path}: unreadable {what} ({type(exc).__name__})") from None


def show_json(value, limit: int = 60) -> str:
    """A value as JSON spells it (true, null, "eight"), cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file from its header alone: the 8-byte length, the JSON, and that
    the tensors' data offsets tile the rest of the file exactly. Never reads the tensor data."""
    header, data_size = _read_safetensors_header(path)
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ModelError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
            continue
        spans.append((*_tensor_span(path, name, entry), name))
    spans.sort()
    end = spans[-1][1] if spans else 0
    if end > data_size:
        raise ModelError(f"{path}: truncated safetensors file (its header describes {end} bytes of tensor data, "
                         f"the file holds {data_size})")
    at = 0
    for begin, stop, name in spans:
        if begin != at:
            raise ModelError(f"{path}: corrupt safetensors header (data of tensor {name!r} overlaps another "
                             "or leaves a gap)")
        at = stop
    if at != data_size:
        raise ModelError(f"{path}: corrupt safetensors file ({data_size - at} bytes after the last tensor)")


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, bytes of tensor data after it), reading the 8-byte length and the header only."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            if size < 8:
                raise ModelError(f"{path}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(fh.read(8), "little")
            if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path}: truncated or corrupt safetensors file (header length {n}, "
                                 f"file size {size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, size - 8 - n


def _tensor_span(path: Path, name: str, entry) -> tuple[int, int]:
    """(begin, end) of one tensor's data, checked against its dtype and shape."""
    def is_uint(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and all(map(is_uint, entry["shape"]))
          and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
          and all(map(is_uint, entry["data_offsets"])) and entry["data_offsets"][0] <= entry["data_offsets"][1])
    if not ok:
        raise ModelError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})")
    bits = SAFETENSORS_DTYPE_BITS.get(entry.get("dtype"))
    if bits is None:
        raise ModelError(f"{path}: corrupt safetensors header (tensor {name!r} has unknown dtype "
                         f"{show_json(entry.get('dtype'))})")
    begin, end = entry["data_offsets"]
    need = math.prod(entry["shape"]) * bits
    if need % 8 or need // 8 != end - begin:
        raise ModelError(f"{path}: corrupt safetensors header (tensor {name!r} has {end - begin} bytes, "
                         f"its dtype and shape need {need / 8:g})")
    return begin, end


def check_pickle(path: Path) -> None:
    """Open a pickle checkpoint with torch's safe loader (weights_only=True) on the meta device:
    the pickle is checked, the tensor data is not read."""
    import torch

    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal or corruption, by whatever type torch raises
        raise ModelError(f"{path}: {_pickle_refusal(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a PyTorch state dict (a mapping of names to tensors)")


def _pickle_refusal(exc: Exception) -> str:
    text = str(exc)
    denied = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if denied:
        return f"refused by torch's safe loader (weights_only=True): it references {denied.group(1)}"
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if reason and not reason.group(1).startswith("Unsupported operand"):  # that one: bytes that are no pickle
        return f"refused by torch's safe loader (weights_only=True): {reason.group(1).strip().rstrip('.')[:160]}"
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}; truncated or corrupt?)"


def check_loading_info(label: Path, info: dict) -> None:
    """Refuse weights that left tensors of the model uninitialised, brought tensors the model
    does not have, or have other shapes. ``info`` is from ``from_pretrained(output_loading_info=True)``."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ModelError(f"{label}: weights do not match the config: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors (e.g. {example!r})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        key, ckpt, model = mismatched[0][:3]
        raise ModelError(f"{label}: weights do not match the config: {len(mismatched)} tensors have other shapes "
                         f"(e.g. {key!r}: {list(ckpt)} in the weights, {list(model)} in the config)")
    errors = [str(e) for e in info.get("error_msgs") or () if str(e).strip()]
    if errors:
        raise ModelError(f"{label}: weights do not load ({errors[0].strip().splitlines()[0][:200]})")


def check_config_values(path: Path, cfg: dict) -> None:
    """The config.json values the model is built from: sizes are positive integers, token ids
    non-negative integers, sub-configs JSON objects."""
    for section, keys in CONFIG_POSITIVE_INTS.items():
        sub = cfg.get(section)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ModelError(f"{path}: {section} must be a JSON object (got a {_json_kind(sub)})")
        for key in keys:
            value = sub.get(key)
            if value is not None and not _is_int(value, 1):
                raise ModelError(f"{path}: {section}.{key} must be a positive integer (got {show_json(value)})")
    for key in CONFIG_TOKEN_IDS:
        value = cfg.get(key)
        if value is not None and not _is_int(value, 0):
            raise ModelError(f"{path}: {key} must be a non-negative integer (got {show_json(value)})")


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
