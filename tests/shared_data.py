"""The one way tests reach ../shared (real data and checkpoints): skip cleanly when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OFFICIAL_T32 = ("models", "medmamba_t_pneumoniamnist32", "medmamba_t_pneumoniamnist32.pth")
PNEUMONIAMNIST = ("data", "pneumoniamnist", "pneumoniamnist_trainval.npz")


def require_shared(*relative_parts: str) -> Path:
    path = SHARED.joinpath(*relative_parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/{'/'.join(relative_parts)} (real data; absent on this machine)")
    return path
