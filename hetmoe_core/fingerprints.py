"""Model fingerprints, the model part of every cache key: sha256 of a checkpoint's files, remembered per file stamp.

No torch here: a cache-hit evaluation computes its keys from the request and these file hashes alone, so it answers
without importing the deep-learning stack (``models.load_model`` uses the same functions for the loaded model).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from .store import canonical_json

DEFAULT_DIR = Path(__file__).parent / "assets" / "default"


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 (first 16 hex) of a folder's config and safetensors files, by content."""
    h = hashlib.sha256()
    folder = Path(folder)
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


_FP_CACHE = Path(__file__).resolve().parent.parent / "cache" / "fingerprints.json"
_fp_lock = threading.Lock()


def source_fingerprint(source: str, revision: str | None = None) -> str:
    """The fingerprint ``models.load_model(source).fingerprint`` will have, without loading the model.

    Local folders ("default" included): sha256 of config.json and *.safetensors (:func:`weights_fingerprint`),
    remembered in cache/fingerprints.json per (path, inode, size, mtime, ctime) of those files: replacing the
    weights in place with the same size and a preserved mtime (``cp -p``, ``touch -r``) still changes the ctime,
    which no user-level copy can set, so the weights are hashed again. Hub ids: "hub:<id>@<revision>".
    "tiny:<family>": "tiny:<family>:seed0". Raises ValueError for an empty source.
    """
    source = (source or "").strip()
    if not source:
        raise ValueError("empty model source: give 'default', a Hugging Face hub id (org/name) or a local folder")
    if source.startswith("tiny:"):
        return f"{source}:seed0"
    if source == "default":
        folder = DEFAULT_DIR
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            return f"hub:{source}@{revision or 'main'}"
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    if not all(f.exists() for f in files) or len(files) < 2:
        raise ValueError(f"{folder} needs config.json and *.safetensors weights")
    stats = [(f.name, f.stat()) for f in files]
    stamp = canonical_json([[n, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns] for n, st in stats])
    path = str(folder.resolve())
    with _fp_lock:
        memo = json.loads(_FP_CACHE.read_text()) if _FP_CACHE.exists() else {}
        hit = memo.get(path)
        if hit and hit.get("stamp") == stamp:
            return hit["fingerprint"]
        fp = weights_fingerprint(folder)
        memo[path] = {"stamp": stamp, "fingerprint": fp}
        _FP_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _FP_CACHE.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, _FP_CACHE)
    return fp


def forget_fingerprints() -> None:
    """Drop the remembered folder fingerprints (cache/fingerprints.json): the next lookup hashes the weights again."""
    _FP_CACHE.unlink(missing_ok=True)
