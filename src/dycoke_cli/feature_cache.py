"""Vision features on disk, so that a clip encoded once is not read and encoded again.

An entry holds what the vision tower gave for one chunk of frames of a clip, model, frame count
and dtype (after the projector and pooling, before any token selection), with those frames'
VideoInfo and where the reader stood after them (encoder.py reads and writes them in order). Entries are
safetensors files named by the key's digest in ``$DYCOKE_CACHE``, else ``$XDG_CACHE_HOME/dycoke``,
else ``~/.cache/dycoke``. They are written atomically (a temporary file, then a rename), kept
under a size limit (``$DYCOKE_CACHE_MAX_MB``, default 2048) by evicting the least recently
used (a hit touches the file), and never trusted blindly: an entry that does not load, or does
not have the shapes its key promises, is ignored and rewritten. A folder that cannot be written
costs speed, never the answer. Only files named like entries are ever counted or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .video.read import VideoInfo

DEFAULT_LIMIT_MB = 2048
_ENTRY = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_CHUNK = 1 << 20
FORMAT = 2  # bumped when what an entry holds changes (2: entries of a chunk of frames each)
WEIGHT_SAMPLE = 1 << 20  # bytes read from each end of a weight file for the model identity


def default_folder() -> Path:
    if os.environ.get("DYCOKE_CACHE"):
        return Path(os.environ["DYCOKE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dycoke"


def default_limit() -> int:
    raw = os.environ.get("DYCOKE_CACHE_MAX_MB", "")
    try:
        return max(0, int(float(raw) * 2**20)) if raw else DEFAULT_LIMIT_MB * 2**20
    except ValueError:
        return DEFAULT_LIMIT_MB * 2**20


def file_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of a regular file's bytes, read in chunks; None for anything else or anything
    unreadable (the video reader then says why). Opened without blocking and checked before
    reading: a FIFO or a device is never read (it could block or never end)."""
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:  # a folder, a FIFO, a device (fdopen itself refuses a folder)
        os.close(fd)
        return None
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            os.set_blocking(fd, True)
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        except (OSError, ValueError):
            return None
    return h.hexdigest()


def model_identity(lm) -> str | None:
    """What makes a checkpoint's features what they are: the family and device, its config files,
    and of its weight files (shards in subfolders too) the name, size, modification time and a
    sample of the bytes (the first and last ``WEIGHT_SAMPLE`` bytes: a copy of another
    checkpoint's layout with other weights differs there, and reading it costs nothing next to
    loading). None for a model not loaded from a folder."""
    folder = Path(lm.path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return None
    h = hashlib.sha256(f"{lm.family}\0{getattr(lm.device, 'type', lm.device)}".encode())
    try:
        for p in sorted(folder.rglob("*")):
            name = str(p.relative_to(folder)).encode()
            if p.suffix == ".json" and p.is_file():
                h.update(name + b"\0" + p.read_bytes())
            elif p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file():
                st = p.stat()
                h.update(name + f"\0{st.st_size}\0{st.st_mtime_ns}\0".encode() + _weight_sample(p, st.st_size))
    except OSError:
        return None  # a folder we cannot fully read: no caching rather than a wrong key
    return h.hexdigest()


def _weight_sample(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        head = f.read(WEIGHT_SAMPLE)
        if size > 2 * WEIGHT_SAMPLE:
            f.seek(size - WEIGHT_SAMPLE)
        return head + f.read(WEIGHT_SAMPLE)


@dataclass(frozen=True)
class FeatureKey:
    content: str  # file_digest of the clip
    model: str  # model_identity
    frames: int  # frames requested
    dtype: str
    chunk: int = 0  # which entry of the clip's (encoder.CACHE_CHUNK frames each)

    def digest(self) -> str:
        text = json.dumps([FORMAT, self.content, self.model, self.frames, self.dtype, self.chunk])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedFeatures:
    features: object  # torch.Tensor [T, N, D]
    newline: object | None  # torch.Tensor [1, D]
    info: dict  # VideoInfo.to_dict()
    deepstack: tuple = ()  # Qwen3-VL's DeepStack levels, torch.Tensor [T, N, D] each


class FeatureCache:
    def __init__(self, folder: str | os.PathLike | None = None, limit_bytes: int | None = None):
        self.folder = Path(folder) if folder is not None else default_folder()
        self.limit = default_limit() if limit_bytes is None else limit_bytes

    def entries(self) -> list[Path]:
        """Entry files, least recently used first."""
        try:
            found = [p for p in self.folder.iterdir() if _ENTRY.match(p.name) and p.is_file()]
        except OSError:
            return []
        return sorted(found, key=_mtime)

    def size(self) -> int:
        return sum(_size(p) for p in self.entries())

    def get(self, key: FeatureKey) -> CachedFeatures | None:
        path = self.folder / f"{key.digest()}.safetensors"
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
                newline = f.get_tensor("newline") if "newline" in f.keys() else None
                levels = int(meta.get("deepstack", "0"))
                deepstack = tuple(f.get_tensor(f"deepstack.{i}") for i in range(levels))
            info = json.loads(meta["info"])
            VideoInfo.from_dict(info)  # complete and well typed, or a miss
            layout = info.get("layout") or {}
            ok = meta.get("key") == key.digest() and features.dim() == 3 and str(features.dtype) == key.dtype
            ok = ok and 1 <= features.shape[0] <= len(info["timestamps"]) <= key.frames  # steps <= frames
            ok = ok and all(isinstance(layout.get(k, 0), (int, float)) for k in ("rows", "cols", "step_seconds"))
            ok = ok and all(level.shape == features.shape for level in deepstack)
        except Exception:  # noqa: BLE001 - a damaged entry of any kind is a miss, rewritten later
            return None
        if not ok:
            return None
        _touch(path)
        return CachedFeatures(features, newline, info, deepstack)

    def put(self, key: FeatureKey, features, newline, info: dict, deepstack: tuple = ()) -> bool:
        """Store an entry (with DeepStack levels, if the family has them); False (and nothing
        changed) when the folder cannot be written."""
        from safetensors.torch import save_file

        tensors = {"features": features.detach().cpu().contiguous()}
        if newline is not None:
            tensors["newline"] = newline.detach().cpu().contiguous()
        for i, level in enumerate(deepstack):
            tensors[f"deepstack.{i}"] = level.detach().cpu().contiguous()
        meta = {"key": key.digest(), "info": json.dumps(info), "format": str(FORMAT),
                "deepstack": str(len(deepstack))}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, self.folder / f"{key.digest()}.safetensors")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
            return False
        self.evict()
        return True

    def evict(self) -> int:
        """Remove least recently used entries until the total fits the limit; how many went."""
        entries = self.entries()
        total, removed = sum(_size(p) for p in entries), 0
        for p in entries:
            if total <= self.limit:
                break
            total -= _size(p)
            removed += _unlink(p)
        return removed

    def clear(self) -> int:
        return sum(_unlink(p) for p in self.entries())


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _touch(p: Path) -> None:
    try:
        os.utime(p)
    except OSError:
        pass  # a read-only cache still serves hits; it just forgets the order


def _unlink(p: Path) -> int:
    try:
        p.unlink()
        return 1
    except OSError:
        return 0
