"""Expert weights as one tensor per projection, computed with a grouped GEMM.

Shape legend: M rows (token-choices, expert-contiguous), D model dim, F ffn dim, E local experts,
Q source ranks (capacity layout), C capacity (slots per expert and source rank), G = 2F for a gated activation
(SwiGLU: w1 holds [gate | up] columns per expert, gate first) else F.

Variable segments (dropless): ``torch._grouped_mm`` where it exists and works for the device/dtype (probed
once); otherwise a custom autograd Function loops over the expert segments with ``torch.mm`` into
preallocated outputs (autograd through slices + cat would allocate a full-size zero gradient per slice in
backward).

Fixed segments (capacity mode, [Q, E, C, D]): batched GEMMs (``torch.bmm`` over the experts) for the
activations, their gradients and the weight gradients (accumulated over Q). On CPU this beats the grouped
GEMM (benchmarks/moe_layer.py): bmm runs each expert's product on one thread and spreads the experts over
the threads, where the per-segment calls of the grouped GEMM split every small product across threads.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def swiglu(h_MG: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim (G = 2F) -> [..., F]."""
    gate, up = h_MG.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS = {
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_exact": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": swiglu,
}
GATED_ACTIVATIONS = ("swiglu",)  # w1 has 2F columns: [gate | up]

_GROUPED_MM_OK: dict[tuple, bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense (``_grouped_mm``'s backward rejects the
    stride-0 gradient that e.g. ``y.sum().backward()`` produces)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            # the probe runs a backward: it must not fail (and disable the kernel for good) just because the
            # first call came under no_grad or inference_mode (serving)
            with torch.inference_mode(False), torch.enable_grad():
                ok = _probe_grouped_mm_once(device, dtype)
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm_once(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        # fixed values, not torch.randn: the probe must not consume the global RNG (router noise and resumed
        # runs depend on its exact state)
        x = (torch.arange(24 * 16, device=device) % 7 - 3).to(dtype).view(24, 16).requires_grad_()
        w = (torch.arange(3 * 256, device=device) % 5 - 2).to(dtype).view(3, 16, 16).requires_grad_()
        offs = torch.tensor([8, 8, 24], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:8] @ w[0], x[8:] @ w[2]])
        ok = bool(torch.allclose(y.float(), ref.float(), atol=1e-2, rtol=1e-2))
        return ok and bool(w.grad[1].abs().max() == 0)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class _SegmentMM(torch.autograd.Function):
    """y[seg_i] = x[seg_i] @ w[expert_i] for consecutive row segments (``counts`` rows each; segment i uses
    expert i, or ``experts[i]`` when given - an expert may then have several segments, and its weight gradient
    sums over them); rows past sum(counts) get zeros."""

    @staticmethod
    def forward(ctx, x_MD, w_EDF, counts, experts):
        ctx.save_for_backward(x_MD, w_EDF)
        ctx.counts, ctx.experts = counts, experts if experts is not None else range(len(counts))
        y_MF = x_MD.new_empty(x_MD.shape[0], w_EDF.shape[2])
        end = 0
        for e, n in zip(ctx.experts, counts):
            if n:
                torch.mm(x_MD[end:end + n], w_EDF[e], out=y_MF[end:end + n])
            end += n
        if end < x_MD.shape[0]:
            y_MF[end:].zero_()
        return y_MF

    @staticmethod
    def backward(ctx, g_MF):
        x_MD, w_EDF = ctx.saved_tensors
        g_MF = g_MF.contiguous()
        gx = torch.empty_like(x_MD) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            written = [False] * w_EDF.shape[0]
            gw = torch.empty_like(w_EDF)
        end = 0
        for e, n in zip(ctx.experts, ctx.counts):
            seg = slice(end, end + n)
            if gx is not None and n:
                torch.mm(g_MF[seg], w_EDF[e].t(), out=gx[seg])
            if gw is not None and n:
                if written[e]:
                    gw[e].addmm_(x_MD[seg].t(), g_MF[seg])
                else:
                    torch.mm(x_MD[seg].t(), g_MF[seg], out=gw[e])
                    written[e] = True
            end += n
        if gw is not None:
            for e in range(w_EDF.shape[0]):
                if not written[e]:
                    gw[e].zero_()
        if gx is not None and end < x_MD.shape[0]:
            gx[end:].zero_()
        return gx, gw, None, None


class _ExpertBMM(torch.autograd.Function):
    """y[q, e] = x[q, e] @ w[e] for x [Q, E, C, K], w [E, K, N] -> y [Q, E, C, N]."""

    @staticmethod
    def forward(ctx, x_QECK, w_EKN):
        ctx.save_for_backward(x_QECK, w_EKN)
        x_QECK = x_QECK.contiguous()
        y = x_QECK.new_empty(x_QECK.shape[:3] + (w_EKN.shape[2],))
        for q in range(x_QECK.shape[0]):
            torch.bmm(x_QECK[q], w_EKN, out=y[q])
        return y

    @staticmethod
    def backward(ctx, g_QECN):
        x_QECK, w_EKN = ctx.saved_tensors
        g_QECN = g_QECN.contiguous()
        Q = x_QECK.shape[0]
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x_QECK)
            w_ENK = w_EKN.transpose(1, 2)
            for q in range(Q):
                torch.bmm(g_QECN[q], w_ENK, out=gx[q])
        if ctx.needs_input_grad[1]:  # batched over the experts, accumulated over the source ranks
            gw = torch.empty_like(w_EKN)
            torch.bmm(x_QECK[0].transpose(1, 2), g_QECN[0], out=gw)
            for q in range(1, Q):
                gw.baddbmm_(x_QECK[q].transpose(1, 2), g_QECN[q])
        return gx, gw


def grouped_mm(x_MD: Tensor, w_EDF: Tensor, counts_E: Tensor, *, offs: Tensor | None = None,
               counts_list: list[int] | None = None, force_fallback: bool = False,
               segment_experts: list[int] | None = None) -> Tensor:
    """Grouped GEMM over expert-contiguous rows: segment e (counts_E[e] rows) times w_EDF[e]; with
    ``segment_experts`` segment i (counts_list[i] rows) times w_EDF[segment_experts[i]] (the segment loop).

    Rows past sum(counts_E) are unspecified (the fallback writes zeros); callers pass exactly the routed rows.
    """
    if segment_experts is not None:
        return _SegmentMM.apply(x_MD, w_EDF, counts_list, segment_experts)
    if not force_fallback and _probe_grouped_mm(x_MD.device, x_MD.dtype):
        if offs is None:
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
        try:
            return _ContiguousGrad.apply(torch._grouped_mm(x_MD, w_EDF, offs=offs))
        except RuntimeError:  # e.g. alignment constraints of a CUDA kernel at this shape
            pass
    if counts_list is None:
        counts_list = [int(c) for c in counts_E.tolist()]
    return _SegmentMM.apply(x_MD, w_EDF, counts_list, None)


class GroupedExperts(nn.Module):
    """E_local two-layer MLP experts: y = act(x @ w1[e]) @ w2[e]; no biases.

    w1 [E, D, F] and w2 [E, F, D]; with ``activation="swiglu"`` w1 is [E, D, 2F], per expert the gate columns
    then the up columns, and act(h) = silu(h[:, :F]) * h[:, F:] (one GEMM for both input projections).

    Row i of w1/w2 is global expert ``global_expert_ids[i]`` (checkpointing writes one file per global id).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, activation: str = "gelu",
                 layer_id: int = 0, global_expert_ids: list[int] | None = None, init_std: float = 0.02,
                 out_init_std: float | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; allowed: {sorted(ACTIVATIONS)}")
        if global_expert_ids is None:
            global_expert_ids = list(range(num_experts))
        if len(global_expert_ids) != num_experts:
            raise ValueError(f"global_expert_ids has {len(global_expert_ids)} ids, expected {num_experts}")
        self.num_experts = num_experts
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.layer_id = int(layer_id)
        self.global_expert_ids = [int(g) for g in global_expert_ids]
        self.init_std = init_std
        self.out_init_std = init_std if out_init_std is None else out_init_std
        self.force_fallback = False  # True: always the segment-loop GEMM (tests, debugging)
        self.ffn_size = ffn_size
        gated = 2 if activation in GATED_ACTIVATIONS else 1
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, gated * ffn_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.out_init_std)

    def _weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, w1, w2) in the compute dtype: the autocast dtype when autocast is on for x's device (as
        ``nn.Linear`` would run; the casts are differentiable, so the fp32 parameters get fp32 grads), else
        the weights' own dtype. The custom GEMM functions below are outside autocast's op lists."""
        dt = self.w1.dtype
        if torch.is_autocast_enabled(x.device.type) and dt == torch.float32:
            dt = torch.get_autocast_dtype(x.device.type)
        return x.to(dt), self.w1.to(dt), self.w2.to(dt)

    def forward(self, x_MD: Tensor, counts_E: Tensor, scale_M: Tensor | None = None, *,
                force_fallback: bool | None = None) -> Tensor:
        """x_MD: rows sorted by local expert, counts_E[e] rows each (sum <= M); returns [M, D]. A 2-D
        ``counts_QE`` [Q, E] means rows in (source rank, local expert) order - the expert-parallel exchange
        without its re-sort - computed by the segment loop (Q*E segments).

        ``scale_M`` (the gate weights) multiplies each row's output; it is applied to whichever of the
        activation [M, F] or the output [M, D] is narrower (same result, fewer bytes touched).
        """
        if force_fallback is None:
            force_fallback = self.force_fallback
        x_MD, w1, w2 = self._weights(x_MD)
        with torch.autocast(x_MD.device.type, enabled=False):
            return self._forward(x_MD, w1, w2, counts_E, scale_M, force_fallback)

    def _forward(self, x_MD, w1, w2, counts_E, scale_M, force_fallback) -> Tensor:
        offs = None
        counts_list = None
        seg_experts = None
        if counts_E.dim() == 2:
            Q, E = counts_E.shape
            counts_list = [int(c) for c in counts_E.reshape(-1).tolist()]
            seg_experts = list(range(E)) * Q
        elif force_fallback or not _probe_grouped_mm(x_MD.device, x_MD.dtype):
            counts_list = [int(c) for c in counts_E.tolist()]
        else:
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
        h_MG = grouped_mm(x_MD, w1, counts_E, offs=offs, counts_list=counts_list,
                          force_fallback=force_fallback, segment_experts=seg_experts)
        h_MF = self.act(h_MG)
        scale_h = scale_M is not None and h_MF.shape[1] <= x_MD.shape[1]
        if scale_h:
            h_MF = h_MF * scale_M.unsqueeze(1).to(h_MF.dtype)
        y_MD = grouped_mm(h_MF, w2, counts_E, offs=offs, counts_list=counts_list,
                          force_fallback=force_fallback, segment_experts=seg_experts)
        if scale_M is not None and not scale_h:
            y_MD = y_MD * scale_M.unsqueeze(1).to(y_MD.dtype)
        return y_MD

    def forward_capacity(self, x_QECD: Tensor, scale_QEC: Tensor | None = None) -> Tensor:
        """Capacity layout: x_QECD[q, e] are the C slots of local expert e coming from EP rank q (unused slots
        hold zeros); returns y_QECD. ``scale_QEC`` multiplies each slot's output (as in :meth:`forward`)."""
        x_QECD, w1, w2 = self._weights(x_QECD)
        with torch.autocast(x_QECD.device.type, enabled=False):
            h = self.act(_ExpertBMM.apply(x_QECD, w1))
            scale_h = scale_QEC is not None and h.shape[-1] <= x_QECD.shape[-1]
            if scale_h:
                h = h * scale_QEC.unsqueeze(-1).to(h.dtype)
            y = _ExpertBMM.apply(h, w2)
            if scale_QEC is not None and not scale_h:
                y = y * scale_QEC.unsqueeze(-1).to(y.dtype)
            return y

    def extra_repr(self) -> str:
        E, D, _ = self.w1.shape
        Fd = self.ffn_size
        return f"experts={E}, hidden={D}, ffn={Fd}, act={self.activation}, layer_id={self.layer_id}"


def iter_expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, int, list[int]]]:
    """Yield (param_name, param, layer_id, global_expert_ids) for every GroupedExperts param in ``model``."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for p_name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                yield full, p, mod.layer_id, list(mod.global_expert_ids)


def is_expert_param_name(name: str, model: nn.Module) -> bool:
    """True if ``name`` is a parameter of a GroupedExperts module in ``model``."""
    return any(n == name for n, _, _, _ in iter_expert_params(model))

