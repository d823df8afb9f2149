"""Train the small MedMamba bundled as the package's default model (PneumoniaMNIST, 32×32 input).

Same recipe as the shared official MedMamba-T checkpoint (../shared/models/medmamba_t_pneumoniamnist32/
TRAINING.md), on a much smaller network so the repository stays light:

    28×28 uint8 → float / 255 → 3 channels → bilinear resize to 32×32 → (x − 0.5) / 0.5,
    random horizontal flips, Adam, batch 32, the best epoch on the val split kept.

The checkpoint is written exactly as the official ``train.py`` writes it, ``torch.save(net.state_dict(),
path)`` whenever val accuracy improves, with ``class_indices.json`` beside it, so it exercises the same
loading path as a user's own checkpoint.

    python examples/train_bundled.py            # 10-15 min on one CPU core
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medmamba_edge.checkpoint import load_checkpoint
from medmamba_edge.runtime.files import sha256_file
from medmamba_edge.model import VSSM

REPO = Path(__file__).resolve().parents[1]
DEPTHS = [1, 1, 2, 1]
DIMS = [32, 64, 128, 256]
CLASS_INDICES = {"0": "normal", "1": "pneumonia"}
CHECKPOINT_NAME = "medmamba_pneumoniamnist32_tiny.pth"
INPUT_SIZE = 32
BATCH_SIZE = 32


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 → (N, 3, 32, 32) float, the official checkpoint's preprocessing."""
    x = torch.from_numpy(images).float().div(255.0)[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of correct predictions, in eval mode; no_grad lets the scan take its fast path."""
    model.eval()
    correct = 0
    for start in range(0, len(inputs), 128):
        logits = model(inputs[start:start + 128])
        correct += int((logits.argmax(dim=1) == labels[start:start + 128]).sum())
    return correct


def build_net() -> VSSM:
    """The bundled network, untrained. It was trained without stochastic depth (the official default rate is 0.1)."""
    return VSSM(depths=DEPTHS, dims=DIMS, num_classes=len(CLASS_INDICES), drop_path_rate=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared/data/pneumoniamnist/pneumoniamnist_trainval.npz")
    parser.add_argument("--out", type=Path, default=REPO / "medmamba_edge/assets/models")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; results are reproducible for a given value")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # A dedicated generator for shuffling and flips, so the data order depends only on --seed.
    gen = torch.Generator().manual_seed(args.seed)

    data = np.load(args.data)
    train_x, train_y = to_input(data["train_images"]), torch.from_numpy(data["train_labels"].ravel()).long()
    val_x, val_y = to_input(data["val_images"]), torch.from_numpy(data["val_labels"].ravel()).long()
    print(f"train {len(train_x)} images {np.bincount(train_y.numpy()).tolist()}, "
          f"val {len(val_x)} images {np.bincount(val_y.numpy()).tolist()} (normal, pneumonia)")

    args.out.mkdir(parents=True, exist_ok=True)
    # The official train.py writes class_indices.json before training, with indent=4.
    (args.out / "class_indices.json").write_text(json.dumps(CLASS_INDICES, indent=4))
    save_path = args.out / CHECKPOINT_NAME

    net = build_net()
    print(f"VSSM depths {DEPTHS} dims {DIMS}: {sum(p.numel() for p in net.parameters()):,} parameters")
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    best_acc, best_epoch, started = -1.0, 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        order = torch.randperm(len(train_x), generator=gen)
        running, steps = 0.0, 0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            x = train_x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(net(x), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running, steps = running + loss.item(), steps + 1
            if steps % 40 == 0:
                print(f"  epoch {epoch} step {steps}: loss {running / steps:.4f}", flush=True)
        val_acc = 100.0 * evaluate(net, val_x, val_y) / len(val_x)
        print(f"[epoch {epoch}] train_loss {running / steps:.4f}  val_accuracy {val_acc:.2f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            torch.save(net.state_dict(), save_path)

    # Check what was saved the way users will load it, rather than trusting the in-memory model.
    loaded = load_checkpoint(save_path)
    correct = evaluate(loaded.model, val_x, val_y)
    print(f"best epoch {best_epoch}; reloaded {save_path.name} ({loaded.config.variant}, "
          f"classes {loaded.class_names}): val accuracy {100.0 * correct / len(val_x):.2f} "
          f"({correct}/{len(val_x)})")
    print(f"size {save_path.stat().st_size} bytes, sha256 {sha256_file(save_path)}, "
          f"training {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
