"""A quantized base model, built once and kept in the model cache.

``load_quantized_base(config, device)`` is what ``models.prepare.load_base`` runs for ``quantization.type``
nf4, fp4 or int. In order:

1. **The cache.** ``$LORAFORGE_CACHE/quantized/<name>-<key>/`` holds the quantized model as
   ``quant.serialization`` writes it (``model.safetensors`` + ``config.json``), the tokenizer (or vision
   processor), the generation config and ``loraforge-cache.json``, a manifest with the key's inputs and the
   weights file's size and sha256. A hit is rebuilt on the meta device and filled straight from the file:
   seconds, bit-identical to the first load. A manifest that doesn't match the file (truncated, wrong size,
   hash mismatch) or a file that won't load is reported with a warning, and the entry is rebuilt. The hash is
   checked on a hit unless the file is unchanged since the last check that passed: same size, inode, mtime
   and ctime (ctime moves on every write and can't be set back), recorded only once the file had been still
   for ``SETTLED_SECONDS``, so that a write in the same clock tick can't hide. That spares a 70B NF4 base
   (~37 GB) ~25 s of hashing per load; a byte changed without a write (failing media) is then not caught.
2. **Streaming** (``models.streaming_load``) for a Hugging Face safetensors folder, the ``default`` model's
   converted folder included: the dense model never exists.
3. **The dense path** otherwise, with the reason: a ``.gguf`` source with nf4/fp4/int (transformers' GGUF
   loader dequantizes the whole file; the result is cached, so this happens once per source and setting),
   the in-process ``tiny-*`` models (nothing on disk; never cached), or a checkpoint that needs one of
   transformers' tensor conversions (``StreamingUnsupported``).

The key is a sha256 of: this cache's format version, ``model.dtype``, the quantization settings, the
compute dtype as resolved for the device (bf16 falls back to fp32 on CPUs without bf16) and the source's
fingerprint (``source_fingerprint``). The fingerprint reads no tensor data, so a 140 GB source is keyed in
milliseconds: every top-level file's name, size and mtime, plus a sha256 of each safetensors header (every
tensor's name, dtype, shape and byte range) and of every file under 16 MiB (configs, tokenizers). A
changed weight file changes its mtime (and usually its size); an edit that keeps both, byte for byte, is
not detected. Hashing every weight byte instead would cost minutes per load of a 70B model.

``LORAFORGE_QUANTIZED_CACHE=off`` turns the cache off (nothing read or written; a 70B NF4 base is ~37 GB).
Entries are never removed on their own: ``loraforge cache`` lists them (source, quantization, size, last
use) and removes them by name or, least recently used first, down to a size (``cached_bases``,
``remove_cached``, ``evict_least_recent``). A hit marks its entry used (the manifest's mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from loraforge.config import ModelConfig
from loraforge.models.sources import DTYPES, _cached_default_dir, cache_root, default_gguf_path, load_model
from loraforge.models.streaming_load import StreamingUnsupported, load_processor, model_skeleton, stream_quantized
from loraforge.quant.quantize_model import COMPUTE_DTYPES, resolve_compute_dtype
from loraforge.utils.atomic import STAGING_INFIX, atomic_dir, atomic_file

CACHE_FORMAT = 1
"""Bump when the stored layout or a quantizer's output changes: older entries are then never hit."""
MANIFEST_NAME = "loraforge-cache.json"
WEIGHTS_NAME = "model.safetensors"
SMALL_FILE_BYTES = 16 << 20
"""Files below this size are hashed whole in the source fingerprint."""
CACHE_SWITCH = "LORAFORGE_QUANTIZED_CACHE"
SETTLED_SECONDS = 2.0
"""A weights file's last change (ctime) must be this much older than a passing hash check for that check to be
trusted on later hits (file timestamps are coarse: a write within the same tick would leave them as they were)."""


def load_quantized_base(config: ModelConfig, device: torch.device):
    """``(model, tokenizer)`` of ``config`` (nf4/fp4/int quantization) on ``device``; see the module docstring."""
    from loraforge.models.prepare import _quantize

    entry = cache_entry(config, device)
    if entry is not None:
        cached = load_cached(entry, config, device)
        if cached is not None:
            return cached
    folder = _streamable_folder(config.source)
    model = None
    if folder is not None:
        try:
            model, tokenizer = stream_quantized(folder, config, device)
        except StreamingUnsupported as reason:
            warnings.warn(f"model {config.source!r} is loaded dense, then quantized: {reason}", stacklevel=2)
    if model is None:
        model, tokenizer = load_model(config.source, config.dtype)
        model = _quantize(model, config).to(device)
    if entry is not None:
        save_cached(entry, model, tokenizer, cache_key(config, device))
    return model, tokenizer


def _streamable_folder(source: str) -> Path | None:
    if source == "default":
        return _cached_default_dir()
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def source_fingerprint(source: str) -> dict | None:
    """What identifies ``source``'s contents (see the module docstring); None for an in-process model."""
    path = default_gguf_path() if source == "default" else Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        return None
    return {"path": str(path.resolve()), "files": [_file_fingerprint(p) for p in files]}


def _file_fingerprint(path: Path) -> list:
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if stat.st_size < SMALL_FILE_BYTES:
            digest.update(file.read())
        elif path.suffix == ".safetensors":
            head = file.read(8)
            digest.update(head)
            digest.update(file.read(min(int.from_bytes(head, "little"), SMALL_FILE_BYTES * 8)))
        else:  # a GGUF's metadata and tensor table come first
            digest.update(file.read(SMALL_FILE_BYTES))
    return [path.name, stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def cache_key(config: ModelConfig, device: torch.device) -> dict | None:
    """The inputs that decide a cached base's bytes; None when ``config.source`` has no files to key on."""
    fingerprint = source_fingerprint(config.source)
    if fingerprint is None:
        return None
    quant = config.quantization
    compute = resolve_compute_dtype(COMPUTE_DTYPES[quant.compute_dtype], device)
    return {"format": CACHE_FORMAT, "dtype": config.dtype, "compute_dtype": str(compute).removeprefix("torch."),
            "quantization": {key: getattr(quant, key) for key in ("type", "bits", "double_quant", "block_size",
                                                                    "group_size")},
            "source": fingerprint}


def cache_entry(config: ModelConfig, device: torch.device) -> Path | None:
    """The folder where ``config``'s quantized base is (or will be) cached; None when nothing is cached."""
    if os.environ.get(CACHE_SWITCH, "on").lower() in ("0", "off", "false", "no"):
        return None
    key = cache_key(config, device)
    if key is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(key["source"]["path"]).stem)[:48]
    quant = key["quantization"]
    return cache_folder() / f"{name}-{quant['type']}{quant['bits']}-{digest}"


def cache_folder() -> Path:
    return cache_root() / "quantized"


def save_cached(entry: Path, model: nn.Module, tokenizer, key: dict | None = None) -> None:
    """Write ``model`` (quantized) and its tokenizer into ``entry`` atomically; a failure only warns.
    ``key`` (``cache_key``'s) is kept in the manifest so that ``loraforge cache`` can say what the entry is."""
    from loraforge.quant.serialization import save_quantized

    try:
        with atomic_dir(entry) as staging:
            save_quantized(model, staging)
            tokenizer.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            weights = staging / WEIGHTS_NAME
            manifest = {"format": CACHE_FORMAT, "name_or_path": model.config._name_or_path, "key": key,
                        "weights": {"size": weights.stat().st_size, "sha256": _sha256(weights)}}
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    except OSError as err:
        warnings.warn(f"could not cache the quantized base in {entry} ({err}); the next load quantizes again",
                      stacklevel=3)


def load_cached(entry: Path, config: ModelConfig, device: torch.device):
    """``(model, tokenizer)`` from a cache entry, or None when there is none or it is damaged (then with a
    warning naming what is wrong; the caller rebuilds it)."""
    from loraforge.quant.serialization import load_quantized

    manifest_path, weights = entry / MANIFEST_NAME, entry / WEIGHTS_NAME
    if not manifest_path.is_file():
        return None
    problem = None
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["weights"]
        size = weights.stat().st_size if weights.is_file() else None
        if size is None:
            problem = f"{WEIGHTS_NAME} is missing"
        elif size != expected["size"]:
            problem = f"{WEIGHTS_NAME} is {size} bytes, the manifest says {expected['size']} (truncated?)"
        elif (unchanged := expected.get("checked") == _file_state(weights)) or _sha256(weights) == expected["sha256"]:
            model = load_quantized(entry, model_skeleton(entry, DTYPES[config.dtype]), device)
            model.config._name_or_path = manifest["name_or_path"]  # as the first load had it, not the cache's path
            tokenizer = load_processor(entry)
            if not unchanged:  # hashed now: later hits can skip it while the file stays as it is
                _record_check(manifest_path, manifest, weights)
            _mark_used(manifest_path)
            return model.to(device), tokenizer
        else:
            problem = f"{WEIGHTS_NAME}'s sha256 differs from the manifest's (corrupted)"
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # json, file, load_quantized's checks
        problem = " ".join(str(err).split())
    warnings.warn(f"the cached quantized base {entry} is damaged ({problem}); rebuilding it", stacklevel=3)
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _file_state(path: Path) -> list[int]:
    """What any write or replacement of ``path`` changes: size, inode, mtime and ctime (ns)."""
    stat = path.stat()
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def _record_check(manifest_path: Path, manifest: dict, weights: Path) -> None:
    """Note in the manifest that ``weights`` passed its hash check as it is now, if it had settled (see
    ``SETTLED_SECONDS``); a read-only cache just checks again next time."""
    state = _file_state(weights)
    if time.time_ns() - state[3] < SETTLED_SECONDS * 1e9:
        return
    manifest["weights"]["checked"] = state
    try:
        atomic_file(manifest_path, lambda path: Path(path).write_text(json.dumps(manifest, indent=2)))
    except OSError:
        pass


def _mark_used(manifest_path: Path) -> None:
    try:
        os.utime(manifest_path)
    except OSError:  # a read-only cache still serves hits
        pass


@dataclass(frozen=True)
class CachedBase:
    """One cache entry as ``loraforge cache`` lists it."""

    path: Path
    source: str
    quantization: str
    nbytes: int
    last_used: float
    """Seconds since the epoch of the last hit (or of the write)."""


def cached_bases() -> list[CachedBase]:
    """Every complete entry of the quantized cache, the most recently used first (staging folders of
    writes in progress are not entries)."""
    folder = cache_folder()
    if not folder.is_dir():
        return []
    entries = []
    for path in folder.iterdir():
        manifest_path = path / MANIFEST_NAME
        if STAGING_INFIX in path.name or not manifest_path.is_file():
            continue
        try:
            key = json.loads(manifest_path.read_text()).get("key") or {}
        except (OSError, ValueError, AttributeError):
            key = {}
        quantization = _describe(key) if key.get("quantization") else "?"
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        entries.append(CachedBase(path, (key.get("source") or {}).get("path", "?"), quantization, nbytes,
                                  manifest_path.stat().st_mtime))
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def _describe(key: dict) -> str:
    """``nf4 block 64, double quant, compute float32`` / ``int4 group 64, compute bfloat16``."""
    quant = key["quantization"]
    if quant["type"] == "int":
        words = [f"int{quant['bits']} group {quant['group_size']}"]
    else:
        words = [f"{quant['type']} block {quant['block_size']}"] + (["double quant"] if quant["double_quant"] else [])
    return ", ".join([*words, f"compute {key.get('compute_dtype')}"])


def remove_cached(entry: CachedBase) -> None:
    """Delete an entry: renamed aside first, so that an interrupted removal never leaves a half-deleted
    folder under the entry's name (what remains is a hidden staging-named folder, not an entry)."""
    aside = entry.path.with_name(f".{entry.path.name}{STAGING_INFIX}{uuid.uuid4().hex[:12]}.removed")
    os.rename(entry.path, aside)
    shutil.rmtree(aside)


def evict_least_recent(max_bytes: int) -> list[CachedBase]:
    """Remove entries, least recently used first, until the cache holds at most ``max_bytes``; returns
    the removed ones."""
    entries = cached_bases()
    total = sum(e.nbytes for e in entries)
    removed = []
    for entry in reversed(entries):
        if total <= max_bytes:
            break
        remove_cached(entry)
        total -= entry.nbytes
        removed.append(entry)
    return removed
