"""The re-implemented architecture against the official checkpoint and the paper's variants."""

import re

import numpy as np
import pytest
import torch

from medmamba_edge import scan
from medmamba_edge.checkpoint import load_checkpoint, read_state_dict
from medmamba_edge.model import SS2D, VSSM, DropPath, concat_shuffled, medmamba_b, medmamba_s, medmamba_t
from tests.shared_data import OFFICIAL_T32, PNEUMONIAMNIST, require_shared


def official_val_accuracy() -> float:
    text = require_shared(*OFFICIAL_T32[:2], "TRAINING.md").read_text()
    return float(re.search(r"val accuracy:\s*([\d.]+)", text).group(1))


def pneumoniamnist_val(size: int = 32):
    """The val split preprocessed as the official checkpoint was trained (see its TRAINING.md)."""
    data = np.load(require_shared(*PNEUMONIAMNIST))
    x = torch.from_numpy(data["val_images"]).float().div(255)[:, None].repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, data["val_labels"][:, 0]


def test_state_dict_matches_official_checkpoint_keys_and_shapes():
    official = read_state_dict(require_shared(*OFFICIAL_T32))
    ours = medmamba_t(num_classes=2).state_dict()
    assert list(ours) == list(official)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


@pytest.mark.parametrize("factory, millions", [(medmamba_t, 14.46), (medmamba_s, 18.63), (medmamba_b, 39.86)])
def test_variant_parameter_counts_match_the_official_model(factory, millions):
    # The official VSSM's counts for 6 classes (fvcore, ../shared/docs/BASELINES.md).
    params = sum(p.numel() for p in factory(num_classes=6).parameters())
    assert round(params / 1e6, 2) == millions


def test_d_state_none_is_the_official_auto_state_size():
    # The official VSSM(d_state=None) gives every block math.ceil(dims[0] / 6) states: 22 for MedMamba-B.
    model = medmamba_b(num_classes=2, d_state=None)
    assert {m.d_state for m in model.modules() if isinstance(m, SS2D)} == {22}
    assert tuple(model.layers[3].blocks[1].self_attention.A_logs.shape) == (4 * 1024, 22)


def test_official_dropout_and_stochastic_depth_rates_act_in_training_only():
    loaded = load_checkpoint(require_shared(*OFFICIAL_T32))
    model = medmamba_t(num_classes=2, drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)
    # The official decay rule: stochastic depth rising linearly over the ten blocks, from 0 to drop_path_rate.
    rates = [0.0 if block.drop_path is None else block.drop_path.drop_prob
             for layer in model.layers for block in layer.blocks]
    assert rates == pytest.approx([0.3 * i / 9 for i in range(10)])
    model.load_state_dict(loaded.model.state_dict())  # strict: the rates add no parameter
    x = pneumoniamnist_val()[0][:16]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.model(x))
        model.train()
        for module in model.modules():  # batch statistics aside, only the dropping is random
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        torch.manual_seed(0)
        first = model(x)
        torch.manual_seed(1)
        assert not torch.allclose(first, model(x))
    # timm's DropPath: a whole sample's branch is dropped or kept, the kept ones scaled by 1 / (1 - p).
    dropped = DropPath(0.5).train()(torch.ones(2000, 3, 4, 5))
    per_sample = dropped.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0.45 < (per_sample[:, 0] == 0).float().mean() < 0.55
    # Bit for bit timm's drop_path, which scales the mask rather than the branch, and at rate 1 drops every sample.
    torch.manual_seed(0)
    dropped = DropPath(0.3).train()(x)
    torch.manual_seed(0)
    assert torch.equal(dropped, x * (x.new_empty(16, 1, 1, 1).bernoulli_(0.7) / 0.7))
    assert torch.equal(DropPath(1.0).train()(x), torch.zeros_like(x))


def test_official_checkpoint_reproduces_recorded_val_accuracy():
    loaded = load_checkpoint(require_shared(*OFFICIAL_T32))
    assert loaded.config.variant == "medmamba_t" and loaded.class_names == ["normal", "pneumonia"]
    x, labels = pneumoniamnist_val()
    with torch.no_grad():
        predictions = torch.cat([loaded.model(x[i:i + 128]) for i in range(0, len(x), 128)]).argmax(1).numpy()
    accuracy = 100 * (predictions == labels).mean()
    assert accuracy == pytest.approx(official_val_accuracy(), abs=0.01)


def test_fast_scan_path_matches_reference_scan_through_the_whole_model(monkeypatch):
    if not scan.scan_cpu.available():
        pytest.skip(scan.scan_cpu.unavailable_reason())
    torch.manual_seed(0)
    model = VSSM(depths=[1, 1, 1, 1], dims=[32, 64, 128, 256], num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setattr(scan.scan_cpu, "available", lambda: False)  # force the Python reference
        reference = model(x)
    assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(36, 44), (50, 50), (33, 97)])
def test_odd_input_sizes_truncate_like_patch_merging(size):
    model = VSSM(depths=[1, 1, 1, 1], dims=[16, 32, 64, 128], num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 2)


def test_reference_scan_matches_an_independent_float64_recurrence():
    rng = np.random.default_rng(0)
    b, d, n, l, g = 2, 8, 5, 13, 2
    u, delta = rng.normal(size=(2, b, d, l))
    delta[0, 0, :3] = 25.0  # beyond the softplus threshold: passed through unchanged
    a = -np.exp(rng.normal(size=(d, n)))
    bs, cs = rng.normal(size=(2, b, g, n, l))
    dd, bias = rng.normal(size=(2, d))
    dt = delta + bias[:, None]
    dt = np.where(dt > 20, dt, np.log1p(np.exp(dt)))
    expected = np.zeros((b, d, l))
    for bi in range(b):
        for di in range(d):
            gi, h = di // (d // g), np.zeros(n)
            for t in range(l):
                h = np.exp(dt[bi, di, t] * a[di]) * h + dt[bi, di, t] * bs[bi, gi, :, t] * u[bi, di, t]
                expected[bi, di, t] = h @ cs[bi, gi, :, t] + dd[di] * u[bi, di, t]
    as_t = [torch.tensor(v, dtype=torch.float32) for v in (u, delta, a, bs, cs, dd, bias)]
    got = scan.selective_scan_ref(*as_t, delta_softplus=True).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_scan_rejects_inconsistent_shapes():
    x = torch.zeros(1, 6, 2, 3)
    weights = dict(x_dbl=torch.zeros(1, 4 * (1 + 2 * 2), 6), dt_projs_weight=torch.zeros(4, 6, 1),
                   dt_projs_bias=torch.zeros(4, 6), A=torch.zeros(24, 2), Ds=torch.zeros(24))
    assert scan.check_ss2d_shapes(x, *weights.values()) == (1, 6, 2, 3, 1, 2)
    with pytest.raises(ValueError, match="x_dbl must be"):
        scan.check_ss2d_shapes(x, **{**weights, "x_dbl": torch.zeros(1, 20, 5)})
    with pytest.raises(ValueError, match="A must be"):
        scan.check_ss2d_shapes(x, **{**weights, "A": torch.zeros(6, 2)})


def test_concat_shuffled_is_the_official_channel_shuffle():
    def official_channel_shuffle(x, groups):  # MedMamba.py's, verbatim in effect
        b, h, w, c = x.shape
        return x.view(b, h, w, groups, c // groups).transpose(3, 4).contiguous().view(b, h, w, -1)

    a, b = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    assert torch.equal(concat_shuffled(a, b), official_channel_shuffle(torch.cat((a, b), dim=-1), 2))
