"""Array files without pickle. They are written into the scratch file of
`MediaStore.writing` (pipeline/media/staging.py), which publishes them whole: a crash never leaves a
partial file under its final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_npy(path: str | Path, array: Any) -> None:
    """np.save without pickle."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def write_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    """np.savez (read back with allow_pickle=False)."""
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, **arrays)
