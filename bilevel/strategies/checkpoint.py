"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, and RNG capture.

A checkpoint holds only tensors and plain Python containers (no pickled objects), so it loads
with the safe unpickler. It is written to a temporary file in the same folder, flushed to disk
and renamed over ``last.pt``, so a crash at any moment leaves either the old or the new file.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.errors import ConfigError, first_line
from bilevel.files import write_atomic

__all__ = ["capture_rng", "fingerprint", "load", "restore_rng", "save_atomic"]


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    return write_atomic(path, lambda fh: torch.save(state, fh))


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with the safe (``weights_only``) unpickler.

    A file that is not a checkpoint (empty, truncated, random bytes, another program's pickle)
    raises :class:`~bilevel.errors.ConfigError` naming it, not an unpickler traceback.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # the unpickler's protocol notes are noise here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError("resume", f"no checkpoint at {path}") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same input error
        raise ConfigError(
            "resume", f"{path} is not a readable bilevel checkpoint ({_why(err, path)})"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise ConfigError("resume", f"{path} is not a bilevel checkpoint (no step recorded)")
    return state


def _why(err: BaseException, path: Path) -> str:
    """A short reason why ``torch.load`` could not read ``path``."""
    text = str(err)
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, EOFError) or "central directory" in text or "PytorchStreamReader" in text:
        return "the file is truncated or is not a torch.save archive"
    if "Weights only load failed" in text or "Unpickl" in type(err).__name__:
        return "it is not a file written by torch.save of tensors and plain containers"
    first = first_line(text) or type(err).__name__
    return first[:160]


def load_plain(path: str | os.PathLike) -> Any:
    """A file written by :func:`torch.save` of tensors and containers (safe unpickler)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def fingerprint(named: list[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """A content hash of tensors (names, shapes, dtypes and up to ``samples`` evenly spaced
    values of each): cheap even for billions of elements, and different bases differ in it with
    overwhelming probability."""
    digest = hashlib.sha256()
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        flat = local.detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        values = flat[::stride][:samples].to("cpu", torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def capture_rng() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states, as safe-to-load values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
