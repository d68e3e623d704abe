"""Atomic file writes: a crash never leaves a partial file under its final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_npy_atomic(path: str | Path, array: Any) -> None:
    """np.save without pickle, under a temporary name renamed into place: a crash never leaves a
    partial array under the final name."""
    import numpy as np

    path = Path(path)
    partial = path.with_name(path.name + ".part")
    try:
        with open(partial, "wb") as f:
            np.save(f, array, allow_pickle=False)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    """np.savez under a temporary name, then rename: no partial file under the final name."""
    import numpy as np

    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    partial.replace(path)
