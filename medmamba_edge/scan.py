"""SS2D's four-direction selective scan, MedMamba's only non-standard operation (the contract:
``runtime/scan_node.py``).

``ss2d_scan_ref`` is the official maths in PyTorch: it gathers each direction's sequence (the official code's
transpose and flips), runs ``mamba_ssm``'s ``selective_scan_fn`` semantics on the four of them (grouped B/C, no
z, float32 state, ``delta_softplus`` with PyTorch's threshold of 20) and adds the four outputs back at their
positions.

``ss2d_scan`` is the same maths registered as the custom op ``medmamba_edge::ss2d_scan``; on the CPU it runs
the compiled kernel shipped with the runtime when that was built (else the reference). ``ss2d_scan_fn`` is what
the model calls: the custom op, or one ``SS2DScan`` node under ``torch.onnx.export``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medmamba_edge.runtime import scan_cpu, scan_node
from medmamba_edge.runtime.scan_node import NUM_DIRECTIONS, SOFTPLUS_THRESHOLD

K = NUM_DIRECTIONS


def check_ss2d_shapes(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds) -> tuple[int, int, int, int, int, int]:
    """Validate an SS2DScan call; return (batch, channels, height, width, dt_rank, d_state)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, channels, height, width), got {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if A.dim() != 2 or A.shape[0] != K * channels:
        raise ValueError(f"A must be ({K}·channels={K * channels}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    if dt_projs_weight.dim() != 3 or tuple(dt_projs_weight.shape[:2]) != (K, channels):
        raise ValueError(f"dt_projs_weight must be ({K}, channels={channels}, dt_rank), got {tuple(dt_projs_weight.shape)}")
    dt_rank = dt_projs_weight.shape[2]
    rows = K * (dt_rank + 2 * d_state)
    if tuple(x_dbl.shape) != (batch, rows, height * width):
        raise ValueError(f"x_dbl must be (batch={batch}, {K}·(dt_rank + 2·d_state)={rows}, height·width={height * width}), "
                         f"got {tuple(x_dbl.shape)}")
    if tuple(dt_projs_bias.shape) != (K, channels) or tuple(Ds.shape) != (K * channels,):
        raise ValueError(f"dt_projs_bias must be ({K}, {channels}) and Ds ({K * channels},), got "
                         f"{tuple(dt_projs_bias.shape)} and {tuple(Ds.shape)}")
    return batch, channels, height, width, dt_rank, d_state


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = True) -> torch.Tensor:
    """mamba_ssm's ``selective_scan_ref`` for MedMamba's call, one Python step per time step, float32 state.

    u, delta (batch, channels, L); A (channels, N); B, C (batch, groups, N, L), channel d in group
    d // (channels / groups); D, delta_bias (channels,)."""
    batch, channels, length = u.shape
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta, threshold=SOFTPLUS_THRESHOLD)
    B = B.repeat_interleave(channels // B.shape[1], dim=1)  # (b, channels, n, l)
    C = C.repeat_interleave(channels // C.shape[1], dim=1)
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    state = u.new_zeros((batch, channels, A.shape[1]))
    ys = []
    for t in range(length):
        state = delta_A[:, :, t] * state + delta_B_u[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", state, C[:, :, :, t]))
    return torch.stack(ys, dim=2) + u * D.float()[:, None]


def ss2d_scan_ref(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, delta_softplus: bool = True) -> torch.Tensor:
    """The SS2DScan node as the official SS2D.forward_core computes it; y (batch, H, W, D) in x's dtype."""
    batch, channels, height, width, dt_rank, d_state = check_ss2d_shapes(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds)
    length = height * width
    orders = torch.from_numpy(np.stack(scan_node.scan_order(height, width))).to(x.device)  # (K, L)
    u = x.float().reshape(batch, channels, length)
    xs = u[:, :, orders].transpose(1, 2)  # (b, K, D, L) in each direction's order
    rows = torch.gather(x_dbl.float().reshape(batch, K, dt_rank + 2 * d_state, length), 3,
                        orders[None, :, None, :].expand(batch, K, dt_rank + 2 * d_state, length))
    dts, bs, cs = torch.split(rows, [dt_rank, d_state, d_state], dim=2)
    dts = torch.matmul(dt_projs_weight.float(), dts)  # (b, K, D, L)
    ys = selective_scan_ref(xs.reshape(batch, K * channels, length), dts.reshape(batch, K * channels, length),
                            A, bs, cs, Ds, dt_projs_bias.reshape(-1), delta_softplus).reshape(batch, K, channels, length)
    y = ys.new_zeros((batch, channels, length))
    for k in range(K):
        y.index_add_(2, orders[k], ys[:, k])
    return y.reshape(batch, channels, height, width).permute(0, 2, 3, 1).to(x.dtype)


@torch.library.custom_op("medmamba_edge::ss2d_scan", mutates_args=())
def ss2d_scan(
    x: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_projs_weight: torch.Tensor,
    dt_projs_bias: torch.Tensor,
    A: torch.Tensor,
    Ds: torch.Tensor,
    delta_softplus: bool = True,
) -> torch.Tensor:
    if x.device.type == "cpu" and scan_cpu.available():
        check_ss2d_shapes(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds)
        arrays = [t.detach().float().contiguous().numpy() for t in (x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds)]
        y = scan_cpu.ss2d_scan(*arrays, delta_softplus=delta_softplus, num_threads=torch.get_num_threads())
        return torch.from_numpy(y).to(x.dtype)
    return ss2d_scan_ref(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, delta_softplus)


@ss2d_scan.register_fake
def _(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, delta_softplus=True):
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3], x.shape[1]))


def ss2d_scan_fn(x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds, delta_softplus: bool = True) -> torch.Tensor:
    inputs = (x, x_dbl, dt_projs_weight, dt_projs_bias, A, Ds)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        # Training (e.g. the bundled checkpoint's script): the reference is differentiable, the kernel is not.
        return ss2d_scan_ref(*inputs, delta_softplus)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{scan_node.DOMAIN}::{scan_node.OP_TYPE}",
            list(inputs),
            scan_node.node_attributes(delta_softplus),
            dtype=x.dtype,
            shape=(x.shape[0], x.shape[2], x.shape[3], x.shape[1]),
            version=scan_node.DOMAIN_VERSION,
        )
    return ss2d_scan(*inputs, delta_softplus)
