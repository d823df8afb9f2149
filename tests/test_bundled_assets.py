"""The bundled checkpoint and sample images: loadable, small, documented, and as accurate as the card says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medmamba_edge.checkpoint import load_checkpoint
from tests.shared_data import PNEUMONIAMNIST, require_shared

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "medmamba_edge" / "assets"
MODELS = ASSETS / "models"
CHECKPOINT = MODELS / "medmamba_pneumoniamnist32_tiny.pth"
MODEL_CARD = MODELS / "MODEL_CARD.md"
SAMPLES = ASSETS / "samples"
ATTRIBUTION = SAMPLES / "ATTRIBUTION.md"
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024


def card_field(pattern: str) -> re.Match:
    match = re.search(pattern, MODEL_CARD.read_text())
    assert match, f"{MODEL_CARD} has no line matching {pattern!r}"
    return match


@pytest.fixture(scope="module")
def bundled():
    return load_checkpoint(CHECKPOINT)


def test_checkpoint_loads_strictly_with_class_names_from_json(bundled):
    # load_checkpoint loads with strict=True and reads class_indices.json beside the file.
    assert bundled.class_names == ["normal", "pneumonia"]
    assert bundled.config.num_classes == 2
    assert not bundled.model.training


def test_checkpoint_matches_model_card(bundled):
    assert bundled.sha256 == card_field(r"sha256[^0-9a-f]*([0-9a-f]{64})").group(1)
    params = sum(p.numel() for p in bundled.model.parameters())
    assert params == int(card_field(r"Parameters\*{0,2}:\s*([\d,]+)").group(1).replace(",", ""))
    depths = [int(d) for d in card_field(r"depths \[([\d, ]+)\]").group(1).split(",")]
    dims = [int(d) for d in card_field(r"dims \[([\d, ]+)\]").group(1).split(",")]
    assert (bundled.config.depths, bundled.config.dims) == (depths, dims)


def test_train_bundled_saves_the_bundled_checkpoint_byte_for_byte(tmp_path):
    # The card's sha256 is that of train_bundled.py's output: its network, given the bundled weights, must save the
    # same bytes (a submodule more, even one without parameters, changes the state_dict's version metadata).
    spec = importlib.util.spec_from_file_location("train_bundled", REPO / "examples" / "train_bundled.py")
    train_bundled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_bundled)
    net = train_bundled.build_net()
    net.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    saved = tmp_path / CHECKPOINT.name  # torch.save names the archive's folder after the file
    torch.save(net.state_dict(), saved)
    assert saved.read_bytes() == CHECKPOINT.read_bytes()


def test_checkpoint_is_small():
    assert CHECKPOINT.stat().st_size < MAX_CHECKPOINT_BYTES


def test_val_accuracy_reproduces_model_card(bundled):
    data = np.load(require_shared(*PNEUMONIAMNIST))
    # The training preprocessing: /255, 3 channels, bilinear 28→32 (align_corners=False), mean = std = 0.5.
    x = torch.from_numpy(data["val_images"]).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    x = (F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) - 0.5) / 0.5
    labels = torch.from_numpy(data["val_labels"].ravel()).long()
    with torch.no_grad():
        predictions = torch.cat([bundled.model(x[i:i + 128]).argmax(dim=1) for i in range(0, len(x), 128)])
    correct = int((predictions == labels).sum())
    card = card_field(r"Val accuracy\*{0,2}:\s*([\d.]+) % \((\d+)/(\d+)\)")
    assert (correct, len(labels)) == (int(card.group(2)), int(card.group(3)))
    assert f"{100.0 * correct / len(labels):.2f}" == card.group(1)


def sample_paths() -> list[Path]:
    return sorted(p for p in SAMPLES.rglob("*.png"))


def test_samples_exist_and_decode():
    paths = sample_paths()
    assert len(list((SAMPLES / "pneumoniamnist").glob("*.png"))) == 6
    assert len(list((SAMPLES / "busi").glob("*.png"))) == 3
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None, f"{path} does not decode"
        assert image.dtype == np.uint8
    for path in (SAMPLES / "pneumoniamnist").glob("*.png"):
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (28, 28), path


def test_every_sample_is_attributed():
    attribution = ATTRIBUTION.read_text()
    missing = [p.name for p in sample_paths() if f"`{p.name}`" not in attribution]
    assert not missing, f"not listed in {ATTRIBUTION}: {missing}"
    for licence in ("CC BY 4.0", "CC0"):
        assert licence in attribution
