"""NSA as a PyTorch operator: `nsa.torch.attention` (torch.library.custom_op, with its autograd
formula and a fake implementation, so torch.compile(fullgraph=True) traces it) and the
`NativeSparseAttention` module holding phi's and the gate MLP's parameters.

Gradients flow to q, k, v, the gates and phi's parameters; the selected blocks are held fixed
(NSA-SPEC.md 7). The backward recomputes the forward pass (the reference's and the CUDA path's
backward take the forward's intermediates from a run of their own), so a training step costs two
forward passes and one backward pass. CPU tensors run the reference (float64, float32), CUDA
tensors the CUDA path (bf16, fp16, fp32 operands).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

import nsa

__all__ = ["attention", "NativeSparseAttention"]


def _phi_dict(compress: str, phi: Sequence[torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    names = nsa.PHI_NAMES[compress]
    if not phi:
        return None
    if len(phi) != len(names):
        raise ValueError(f"compress_params: {len(phi)} tensors, compress = {compress} takes {len(names)} "
                         f"({', '.join(names)})")
    return dict(zip(names, phi))


def _kwargs(cu_seqlens, cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks, compress,
            cmp_hidden, cmp_act, scale, seed) -> Dict[str, Any]:
    return dict(cu_seqlens=cu_seqlens, cmp_len=cmp_len, cmp_stride=cmp_stride, slc_len=slc_len,
                slc_count=slc_count, window=window, init_blocks=init_blocks, local_blocks=local_blocks,
                compress=compress, cmp_hidden=cmp_hidden, cmp_act=cmp_act, scale=scale or None, seed=seed)


@torch.library.custom_op("nsa::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor],
               phi: List[torch.Tensor], cu_seqlens: Optional[List[int]], cmp_len: int, cmp_stride: int,
               slc_len: int, slc_count: int, window: int, init_blocks: int, local_blocks: int, compress: str,
               cmp_hidden: int, cmp_act: str, scale: float, seed: int) -> torch.Tensor:
    kw = _kwargs(cu_seqlens, cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks, compress,
                 cmp_hidden, cmp_act, scale, seed)
    if q.is_cuda:
        return _cuda_attention(q, k, v, gates, phi, kw)
    r = nsa.forward(q, k, v, gates=gates, compress_params=_phi_dict(compress, phi), **kw)
    # The CUDA path returns float32 (its files' dtype); the operator returns q's dtype.
    return r.o.to(q.dtype)


_DRAWN: Dict[Any, List[torch.Tensor]] = {}


def _cuda_attention(q, k, v, gates, phi, kw) -> torch.Tensor:
    """o on the CUDA path, zero-copy on the current stream (nsa._nsa.cuda_attention: a cached plan
    bound to these tensors' memory). Inputs in q's dtype (bf16, fp16, fp32); the gates and phi's
    pe and biases in fp32, its weight matrices in q's dtype, as the plan stores them."""
    nsa._require_cuda("torch.attention")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"q: dtype {nsa._dtype_name(q)} on {q.device}; the CUDA path takes bfloat16, float16 or "
                        "float32 tensors")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, but q is on {q.device}; every input must be on q's device")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {nsa._dtype_name(x)}, but q is {nsa._dtype_name(q)}; give every input "
                            "q's dtype")
    batched = q.dim() == 4
    if q.dim() not in (3, 4):
        raise ValueError(f"q: rank {q.dim()} (shape {list(q.shape)}), expected [T, Hq, dk] or [B, T, Hq, dk]")
    if batched and kw["cu_seqlens"] is not None:
        raise ValueError(f"cu_seqlens is for packed [N, H, D] inputs, but q is a batch {list(q.shape)}")
    B, T = (q.shape[0], q.shape[1]) if batched else (0, q.shape[0])
    flat = lambda x: x.detach().reshape(-1, *x.shape[-2:]).contiguous()  # DLPack refuses tensors needing grad
    q3, k3, v3 = flat(q), flat(k), flat(v)
    N, Hq, Hkv, dv = q3.shape[0], q3.shape[1], k3.shape[1], v3.shape[2]
    g = torch.ones(N, Hq, 3, dtype=torch.float32, device=q.device) if gates is None \
        else flat(gates.to(torch.float32))
    compress = kw["compress"]
    names = nsa.PHI_NAMES[compress]
    if names and not phi:  # drawn from the seed once per setting and device, as the reference draws them
        key = (q.device, q.dtype, Hkv, q3.shape[2], dv, compress, kw["cmp_len"], kw["cmp_hidden"], kw["seed"])
        if key not in _DRAWN:
            d = nsa.compress_params(Hkv, q3.shape[2], dv, compress=compress, cmp_len=kw["cmp_len"],
                                    cmp_hidden=kw["cmp_hidden"], seed=kw["seed"])
            _DRAWN[key] = [torch.from_numpy(d[n]).to(q.device) for n in names]
        phi = _DRAWN[key]
    # Weight matrices in the operand precision, the rest in fp32 (PhiDevice's layout).
    dev_phi = [p.detach().to(q.dtype if n.startswith("w") else torch.float32).contiguous()
               for n, p in zip(names, phi)]
    o = torch.empty(N, Hq, dv, dtype=q.dtype, device=q.device)
    cu = [] if batched or kw["cu_seqlens"] is None else list(kw["cu_seqlens"])
    if batched:
        cu = [b * T for b in range(B + 1)]
    settings = nsa._settings(kw["cmp_len"], kw["cmp_stride"], kw["slc_len"], kw["slc_count"], kw["window"],
                             kw["init_blocks"], kw["local_blocks"], compress, kw["cmp_hidden"], kw["cmp_act"],
                             kw["scale"])
    with torch.cuda.device(q.device):
        nsa._nsa.cuda_attention(settings, q3, k3, v3, g, o, dev_phi, cu, torch.cuda.current_stream().cuda_stream)
    return o.reshape(*q.shape[:-1], dv)


@_attention.register_fake
def _(q, k, v, gates, phi, cu_seqlens, cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks,
      compress, cmp_hidden, cmp_act, scale, seed):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("nsa::attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        gates: Optional[torch.Tensor], phi: List[torch.Tensor], cu_seqlens: Optional[List[int]],
                        cmp_len: int, cmp_stride: int, slc_len: int, slc_count: int, window: int, init_blocks: int,
                        local_blocks: int, compress: str, cmp_hidden: int, cmp_act: str, scale: float,
                        seed: int) -> List[torch.Tensor]:
    kw = _kwargs(cu_seqlens, cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks, compress,
                 cmp_hidden, cmp_act, scale, seed)
    g = nsa.backward(q, k, v, do.to(q.dtype).contiguous(), gates=gates, compress_params=_phi_dict(compress, phi), **kw)
    out = [g.dq.to(q.dtype), g.dk.to(k.dtype), g.dv.to(v.dtype),
           g.dgates.to(gates.dtype) if gates is not None else q.new_empty(0)]
    names = nsa.PHI_NAMES[compress] if phi else ()
    out += [g["d" + n].to(p.dtype) for n, p in zip(names, phi)]
    return out


@_attention_backward.register_fake
def _(do, q, k, v, gates, phi, cu_seqlens, cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks,
      local_blocks, compress, cmp_hidden, cmp_act, scale, seed):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(gates) if gates is not None else q.new_empty(0)] + [torch.empty_like(p) for p in phi]


_SETTING_NAMES = ("cu_seqlens", "cmp_len", "cmp_stride", "slc_len", "slc_count", "window", "init_blocks",
                  "local_blocks", "compress", "cmp_hidden", "cmp_act", "scale", "seed")


def _setup_context(ctx, inputs, output):
    q, k, v, gates, phi = inputs[:5]
    ctx.settings = inputs[5:]
    ctx.has_gates = gates is not None
    ctx.n_phi = len(phi)
    ctx.save_for_backward(q, k, v, gates, *phi)


def _backward(ctx, do):
    q, k, v, gates, *phi = ctx.saved_tensors
    grads = torch.ops.nsa.attention_backward(do, q, k, v, gates, phi, *ctx.settings)
    dq, dk, dv, dgates = grads[:4]
    dphi = list(grads[4:])  # [] for mean: the structure of the input list
    return (dq, dk, dv, dgates if ctx.has_gates else None, dphi) + (None,) * len(_SETTING_NAMES)


torch.library.register_autograd("nsa::attention", _backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: Optional[torch.Tensor] = None,
              compress_params: Optional[Mapping[str, torch.Tensor]] = None, *, cu_seqlens: Optional[List[int]] = None,
              cmp_len: int = 32, cmp_stride: int = 16, slc_len: int = 64, slc_count: int = 16, window: int = 512,
              init_blocks: int = 1, local_blocks: int = 2, compress: str = "mlp", cmp_hidden: int = 0,
              cmp_act: str = "gelu", scale: Optional[float] = None, seed: int = 0) -> torch.Tensor:
    """NSA's output o (Eq. 5) of q [T, Hq, dk] (or [B, T, Hq, dk], or packed with cu_seqlens), shared k, v
    [T, Hkv, D], gates [T, Hq, 3] (None: all ones) and phi's parameters (a dict named as the
    --compress-params files; None: drawn from `seed`, then not trained). Differentiable in q, k, v, gates
    and the parameters; settings as nsa.forward's."""
    if compress not in nsa.PHI_NAMES:
        raise ValueError(f"compress = '{compress}' is not one of: mean, linear, mlp")
    phi: List[torch.Tensor] = []
    if compress_params is not None:
        missing = [n for n in nsa.PHI_NAMES[compress] if n not in compress_params]
        if missing:
            raise ValueError(f"compress_params: '{missing[0]}' is missing (compress = {compress} needs "
                             f"{', '.join(nsa.PHI_NAMES[compress])})")
        phi = [compress_params[n] for n in nsa.PHI_NAMES[compress]]
    cu = None if cu_seqlens is None else [int(c) for c in cu_seqlens]
    return torch.ops.nsa.attention(q, k, v, gates, phi, cu, int(cmp_len), int(cmp_stride), int(slc_len),
                                   int(slc_count), int(window), int(init_blocks), int(local_blocks), compress,
                                   int(cmp_hidden), cmp_act, float(scale or 0.0), int(seed))


class NativeSparseAttention(torch.nn.Module):
    """NSA's attention with its learned parts: phi's parameters (pe_k, w1_k, ... as the --compress-params
    files, drawn as the reference draws them from `seed`) and the gate MLP g = sigmoid(x W + b)
    (NSA-SPEC.md 2; W [d_model, 3*Hq] ~ N(0, 1/d_model) from `seed`, b = 0; column h*3 + c is gate c of
    head h). forward(q, k, v, x) -> o [..., T, Hq, dv], where x [..., T, d_model] are the gate features.
    """

    def __init__(self, Hq: int, Hkv: int, dk: int, dv: int, d_model: int, *, cmp_len: int = 32,
                 cmp_stride: int = 16, slc_len: int = 64, slc_count: int = 16, window: int = 512,
                 init_blocks: int = 1, local_blocks: int = 2, compress: str = "mlp", cmp_hidden: int = 0,
                 cmp_act: str = "gelu", scale: Optional[float] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        self.Hq, self.Hkv, self.dk, self.dv = Hq, Hkv, dk, dv
        nsa._nsa.validate(nsa._settings(cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks,
                                        compress, cmp_hidden, cmp_act, scale), Hq, Hkv, dk, dv)
        self.settings = dict(cmp_len=cmp_len, cmp_stride=cmp_stride, slc_len=slc_len, slc_count=slc_count,
                             window=window, init_blocks=init_blocks, local_blocks=local_blocks, compress=compress,
                             cmp_hidden=cmp_hidden, cmp_act=cmp_act, scale=scale, seed=seed)
        # Drawn in double and rounded to dtype, as the command's --precision float does.
        drawn = nsa.compress_params(Hkv, dk, dv, compress=compress, cmp_len=cmp_len, cmp_hidden=cmp_hidden, seed=seed)
        self.phi_names = nsa.PHI_NAMES[compress]
        for n in self.phi_names:
            self.register_parameter(n, torch.nn.Parameter(torch.from_numpy(drawn[n]).to(dtype=dtype, device=device)))
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d_model, 3 * Hq, generator=gen, dtype=torch.float64) / math.sqrt(d_model)
        self.gate_w = torch.nn.Parameter(w.to(dtype=dtype, device=device))
        self.gate_b = torch.nn.Parameter(torch.zeros(3 * Hq, dtype=dtype, device=device))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g = sigmoid(x W + b) as [..., T, Hq, 3]."""
        return torch.sigmoid(x @ self.gate_w + self.gate_b).unflatten(-1, (self.Hq, 3))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                cu_seqlens: Optional[List[int]] = None) -> torch.Tensor:
        phi = {n: getattr(self, n) for n in self.phi_names} or None
        return attention(q, k, v, self.gates(x), phi, cu_seqlens=cu_seqlens, **self.settings)
