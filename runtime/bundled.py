"""What ships inside the package: a small checkpoint trained on PneumoniaMNIST (assets/models/MODEL_CARD.md)
and real sample images (assets/samples/ATTRIBUTION.md)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from medmamba_edge.errors import UserError

from .decode import IMAGE_SUFFIXES

BUNDLED_CHECKPOINT = "medmamba_pneumoniamnist32_tiny.pth"


def assets_dir() -> Path:
    # Resolved through the package, not this file: runtime/ sits elsewhere in a source checkout.
    return Path(str(files("medmamba_edge"))) / "assets"


def samples_dir() -> Path:
    return assets_dir() / "samples"


def bundled_checkpoint() -> Path:
    """The bundled checkpoint, in the official format (state_dict + class_indices.json beside it)."""
    path = assets_dir() / "models" / BUNDLED_CHECKPOINT
    if not path.is_file():
        raise UserError(f"{path}: the bundled checkpoint is missing (broken installation?)")
    return path


def sample_image_paths(collection: str | None = None) -> list[Path]:
    """All bundled images, or one collection of them (``pneumoniamnist``, ``busi``)."""
    root = samples_dir() / collection if collection else samples_dir()
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{root}: no bundled sample images (broken installation?)")
    return paths
