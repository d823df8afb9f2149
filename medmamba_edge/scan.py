"""The selective scan, MedMamba's only non-standard operation.

``selective_scan_ref`` has exactly the semantics of ``mamba_ssm``'s ``selective_scan_fn`` for the call
MedMamba makes (grouped B/C, no z, float32 state, ``delta_softplus`` with PyTorch's threshold of 20).

``selective_scan`` is the same maths registered as the custom op ``medmamba_edge::selective_scan``; on
the CPU it runs the compiled kernel shipped with the runtime when that was built (else the reference).
``selective_scan_fn`` is what the model calls: the custom op, or one ``SelectiveScan`` node under
``torch.onnx.export`` (see ``runtime/scan_node.py`` for the node's contract).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medmamba_edge.runtime import scan_cpu, scan_node
from medmamba_edge.runtime.scan_node import SOFTPLUS_THRESHOLD


def check_scan_shapes(u, delta, A, B, C, D, delta_bias) -> tuple[int, int, int, int, int]:
    """Validate a scan call; return (batch, channels, length, groups, d_state)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, channels, length), got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (channels={channels}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    if B.dim() != 4 or B.shape[0] != batch or B.shape[2] != d_state or B.shape[3] != length or C.shape != B.shape:
        raise ValueError(
            f"B and C must be (batch={batch}, groups, d_state={d_state}, length={length}), "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    groups = B.shape[1]
    if groups == 0 or channels % groups:
        raise ValueError(f"groups ({groups}) must divide channels ({channels})")
    if D.shape != (channels,) or delta_bias.shape != (channels,):
        raise ValueError(f"D and delta_bias must be ({channels},), got {tuple(D.shape)} and {tuple(delta_bias.shape)}")
    return batch, channels, length, groups, d_state


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = True) -> torch.Tensor:
    """Readable reference: one Python step per time step, float32 state (as mamba_ssm's selective_scan_ref)."""
    batch, channels, length, groups, d_state = check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta, threshold=SOFTPLUS_THRESHOLD)
    B = B.repeat_interleave(channels // groups, dim=1)  # (b, channels, n, l)
    C = C.repeat_interleave(channels // groups, dim=1)
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    state = u.new_zeros((batch, channels, d_state))
    ys = []
    for t in range(length):
        state = delta_A[:, :, t] * state + delta_B_u[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", state, C[:, :, :, t]))
    y = torch.stack(ys, dim=2) + u * D.float()[:, None]
    return y.to(dtype_in)


@torch.library.custom_op("medmamba_edge::selective_scan", mutates_args=())
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    delta_softplus: bool = True,
) -> torch.Tensor:
    if u.device.type == "cpu" and scan_cpu.available():
        check_scan_shapes(u, delta, A, B, C, D, delta_bias)
        arrays = [t.detach().float().contiguous().numpy() for t in (u, delta, A, B, C, D, delta_bias)]
        y = scan_cpu.selective_scan(*arrays, delta_softplus=delta_softplus, num_threads=torch.get_num_threads())
        return torch.from_numpy(y).to(u.dtype)
    return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)


@selective_scan.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus=True):
    return torch.empty_like(u)


def selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = True) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D, delta_bias)):
        # Training (e.g. the bundled checkpoint's script): the reference is differentiable, the kernel is not.
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{scan_node.DOMAIN}::{scan_node.OP_TYPE}",
            [u, delta, A, B, C, D, delta_bias],
            scan_node.node_attributes(delta_softplus),
            dtype=u.dtype,
            shape=u.shape,
            version=scan_node.DOMAIN_VERSION,
        )
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
