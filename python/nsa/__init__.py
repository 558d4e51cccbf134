"""Native Sparse Attention: the exact reference and the CUDA path on NumPy arrays and PyTorch tensors.

The functions are the `nsa` command's subcommands, their keyword arguments its options (without
the dashes, '-' as '_', the same defaults) and their results its files:

    r = nsa.forward(q, k, v)          # r.o, r.o_cmp, r.lse_win, r.block_idx, ... as `nsa forward`
    g = nsa.backward(q, k, v, do)     # g.dq, g.dk, g.dv, g.dgates, g.dw1_k, ... as `nsa backward`
    f = nsa.full_attention(q, k, v)   # f.o, f.lse as `nsa full`
    nsa.compare(actual, expected)     # the rules and report of `nsa compare`

Arrays are `[T, H, D]`, a batch `[B, T, H, D]`, or packed `[N, H, D]` with `cu_seqlens`. CPU
arrays (NumPy, or PyTorch CPU tensors) run the reference in their dtype (float64 or float32);
CUDA tensors run the CUDA path (bf16, fp16 or fp32 operands). Results come back as arrays of the
input's kind on the input's device. docs/python.md has the details.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from . import _nsa

__all__ = [
    "Result", "CompareReport", "forward", "backward", "full_attention", "compress_params", "compare",
    "DecodeCache", "decode_step", "cuda_available", "set_threads", "PHI_NAMES", "testing",
]

# phi's parameters per compression kind, named as the --compress-params files (INTERFACE.md).
PHI_NAMES = {
    "mean": (),
    "linear": ("pe_k", "w_k", "b_k", "pe_v", "w_v", "b_v"),
    "mlp": ("pe_k", "w1_k", "b1_k", "w2_k", "b2_k", "pe_v", "w1_v", "b1_v", "w2_v", "b2_v"),
}
_BRANCH_KV = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")
_GATE_MLP = ("gate_x", "gate_w", "gate_b", "gate_w0", "gate_b0")
# Per-token inputs: packed like q ([B, T, ...] -> [B*T, ...]).
_PER_TOKEN = ("q", "k", "v") + _BRANCH_KV + ("gates", "gate_x")
# Per-token outputs of forward and decode; k/v_cmp_compressed are per compressed row.
_FWD_PER_TOKEN = ("o", "o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win", "gates", "block_idx",
                  "block_scores")
_SETTINGS = ("cmp_len", "cmp_stride", "slc_len", "slc_count", "window", "init_blocks", "local_blocks", "compress",
             "cmp_hidden", "cmp_act", "scale")


class Result(dict):
    """The outputs of a call, named as the command's files: `r.o` or `r["o"]`; `list(r)` the names."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no output '{name}'; the outputs are: {', '.join(self)}") from None

    def __dir__(self) -> Iterable[str]:
        return list(super().__dir__()) + list(self)


def cuda_available() -> bool:
    """True when the extension was built with the CUDA path and a CUDA device is usable."""
    return bool(_nsa.cuda_built) and bool(_nsa.cuda_available())


def set_threads(n: int) -> int:
    """CPU threads of the reference (0: all cores); returns the count in effect. Results do not depend on it."""
    return _nsa.set_threads(int(n))


# ---- Arrays: NumPy or PyTorch, CPU or CUDA ---------------------------------------------------------

def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda")


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def _device_name(x: Any) -> str:
    return str(x.device) if _is_torch(x) else "cpu"


def _foreign_to_numpy(x: Any) -> Any:
    """Another framework's CPU array (JAX, CuPy's host arrays, ...) as a NumPy view through DLPack;
    PyTorch tensors and NumPy arrays are returned as they are."""
    if x is None or isinstance(x, np.ndarray) or _is_torch(x) or not hasattr(x, "__dlpack__"):
        return x
    try:
        return np.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError) as e:
        raise TypeError(f"a {type(x).__name__} that NumPy cannot take through DLPack ({e}); give NumPy arrays or "
                        "PyTorch tensors (CUDA arrays of other frameworks: convert with torch.from_dlpack)") from None


class _Kind:
    """What the inputs are (decided by q): NumPy or PyTorch, which device, which dtype."""

    def __init__(self, q: Any):
        if not (_is_torch(q) or isinstance(q, np.ndarray)):
            raise TypeError(f"q: a {type(q).__name__}, expected a NumPy array or a PyTorch tensor")
        self.torch = _is_torch(q)
        self.cuda = self.torch and q.is_cuda
        self.device = q.device if self.torch else None
        self.dtype = _dtype_name(q)
        if self.cuda:
            if self.dtype not in ("bfloat16", "float16", "float32"):
                raise TypeError(f"q: dtype {self.dtype} on {q.device}; the CUDA path takes bfloat16, float16 or "
                                "float32 tensors")
        elif self.dtype not in ("float64", "float32"):
            raise TypeError(f"q: dtype {self.dtype} on the CPU; the reference computes in float64 or float32 "
                            "(bfloat16 and float16 run on CUDA tensors)")

    def check(self, name: str, x: Any, float_dtype: bool = True) -> None:
        if self.torch != _is_torch(x) or not (_is_torch(x) or isinstance(x, np.ndarray)):
            raise TypeError(f"{name}: a {type(x).__name__}, but q is a "
                            f"{'PyTorch tensor' if self.torch else 'NumPy array'}; give every input as q's kind")
        if _device_name(x) != _device_name_of(self):
            raise ValueError(f"{name}: on {_device_name(x)}, but q is on {_device_name_of(self)}; "
                             "every input must be on q's device")
        if float_dtype and _dtype_name(x) != self.dtype:
            raise TypeError(f"{name}: dtype {_dtype_name(x)}, but q is {self.dtype}; give every input q's dtype")

    def host(self, x: Any, dtype: Optional[str] = None) -> np.ndarray:
        """A C-contiguous NumPy view (copied only when x is not contiguous, or on the device)."""
        if self.torch:
            x = x.detach()
            if x.is_cuda or dtype is not None:
                import torch
                x = x.to(device="cpu", dtype=getattr(torch, dtype) if dtype else None)
            x = x.contiguous().numpy()
        elif dtype is not None:
            x = x.astype(dtype, copy=False)
        return np.ascontiguousarray(x)

    def out(self, x: Optional[np.ndarray]) -> Any:
        """A result array as the inputs' kind: a torch tensor sharing the NumPy array's memory, or on q's device."""
        if x is None or not self.torch:
            return x
        import torch
        t = torch.from_numpy(x)
        return t.to(self.device) if self.cuda else t


def _device_name_of(kind: _Kind) -> str:
    return str(kind.device) if kind.torch else "cpu"


def _settings(cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks, compress, cmp_hidden,
              cmp_act, scale) -> Dict[str, Any]:
    if not isinstance(compress, str):
        raise TypeError(f"compress: {compress!r}, expected one of: mean, linear, mlp")
    return dict(cmp_len=int(cmp_len), cmp_stride=int(cmp_stride), slc_len=int(slc_len), slc_count=int(slc_count),
                window=int(window), init_blocks=int(init_blocks), local_blocks=int(local_blocks), compress=compress,
                cmp_hidden=int(cmp_hidden), cmp_act=str(cmp_act), scale=float(scale or 0.0))


def _load_params(compress_params: Any, compress: str) -> Dict[str, Any]:
    """compress_params: a dict of arrays named as the files, or a folder of those .npy files."""
    if compress_params is None:
        return {}
    if compress == "mean" and (isinstance(compress_params, (str, os.PathLike)) or len(compress_params)):
        raise ValueError("compress = mean has no parameters; compress_params is not used")
    if isinstance(compress_params, (str, os.PathLike)):
        folder = os.fspath(compress_params)
        if not os.path.isdir(folder):
            raise ValueError(f"compress_params {folder}: not a folder")
        out = {}
        for name in PHI_NAMES.get(compress, ()):
            path = os.path.join(folder, name + ".npy")
            if not os.path.exists(path):
                raise ValueError(f"compress_params {path}: no such file (compress = {compress} needs "
                                 f"{', '.join(PHI_NAMES[compress])})")
            out[name] = np.load(path)
        return out
    if not isinstance(compress_params, Mapping):
        raise TypeError(f"compress_params: a {type(compress_params).__name__}, expected a dict of arrays named "
                        f"{', '.join(PHI_NAMES.get(compress, ())) or '(none for mean)'} or a folder")
    unknown = sorted(set(compress_params) - set(PHI_NAMES.get(compress, ())))
    if unknown:
        raise ValueError(f"compress_params: '{unknown[0]}' is not a parameter of compress = {compress} "
                         f"(expected {', '.join(PHI_NAMES.get(compress, ())) or 'none'})")
    return dict(compress_params)


class _Call:
    """One call's inputs, checked and packed to [N, H, D] with cu_seqlens, as `nsa`'s load_workload."""

    def __init__(self, q, k, v, tensors: Dict[str, Any], params: Dict[str, Any], cu_seqlens, extra_per_token=()):
        named = dict(q=q, k=k, v=v, **{n: t for n, t in tensors.items() if t is not None})
        named = {n: _foreign_to_numpy(x) for n, x in named.items()}
        q = named["q"]
        self.kind = kind = _Kind(q)
        for name, x in named.items():
            if name == "q":
                continue
            # The CUDA path keeps the gates (and the gate MLP) in fp32 whatever the operand precision.
            gate_fp32 = kind.cuda and name.startswith("gate") and _dtype_name(x) == "float32"
            kind.check(name, x, float_dtype=not gate_fp32)
        rank = q.ndim
        if rank not in (3, 4):
            raise ValueError(f"q: rank {rank} (shape {list(q.shape)}), expected [T, Hq, dk] or [B, T, Hq, dk]")
        self.batch = int(q.shape[0]) if rank == 4 else 0
        if self.batch and cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for packed [N, H, D] inputs, but q is a batch {list(q.shape)}")
        lead = list(q.shape[:2]) if rank == 4 else [int(q.shape[0])]
        host_dtype = "float32" if kind.cuda else None
        self.arrays: Dict[str, np.ndarray] = {}
        for name, x in named.items():
            per_token = name in _PER_TOKEN or name in extra_per_token
            if per_token and self.batch:
                if x.ndim != q.ndim or list(x.shape[:2]) != lead:
                    raise ValueError(f"{name}: shape {list(x.shape)}, expected [B = {lead[0]}, T = {lead[1]}, ...] "
                                     "like q")
            a = kind.host(x, host_dtype)
            if per_token and self.batch:
                a = a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
            self.arrays[name] = a
        # phi's parameters may be NumPy arrays or tensors whatever q is (nsa.compress_params returns
        # NumPy arrays), on the CPU or on q's device; they are converted to the run's precision.
        for name, x in params.items():
            if not (_is_torch(x) or isinstance(x, np.ndarray)):
                raise TypeError(f"compress_params['{name}']: a {type(x).__name__}, expected an array")
            if _is_torch(x) and x.is_cuda and _device_name(x) != _device_name_of(kind):
                raise ValueError(f"compress_params['{name}']: on {x.device}, but q is on {_device_name_of(kind)}")
            self.arrays[name] = np.ascontiguousarray(_cmp_array(x).astype(host_dtype or kind.dtype, copy=False))
        N = lead[0] * (lead[1] if self.batch else 1)
        if self.batch:
            self.cu = [b * int(lead[1]) for b in range(self.batch + 1)]
        elif cu_seqlens is None:
            self.cu = []
        else:
            cu = cu_seqlens.detach().cpu().numpy() if _is_torch(cu_seqlens) else np.asarray(cu_seqlens)
            if cu.dtype.kind not in "iu" or cu.ndim != 1:
                raise TypeError(f"cu_seqlens: {cu.dtype} of rank {cu.ndim}, expected int [B+1] offsets")
            self.cu = [int(c) for c in cu]
            if len(self.cu) < 2:
                raise ValueError(f"cu_seqlens: {len(self.cu)} offsets; expected B+1 >= 2 (0, ..., N = {N})")
        self.N = N

    def unpack(self, name: str, a: Optional[np.ndarray]) -> Any:
        """[N, ...] -> [B, T, ...] for a batch (and k/v_cmp_compressed [B, Nc, ...]), as the command writes."""
        if a is not None and self.batch and a.ndim >= 1:
            a = a.reshape((self.batch, a.shape[0] // self.batch) + a.shape[1:])
        return self.kind.out(a)

    def result(self, d: Dict[str, np.ndarray]) -> Result:
        out = Result()
        for name, a in d.items():
            if name == "cu_seqlens_cmp":  # written only for packed sequences, as by `nsa forward`
                if self.batch or len(self.cu) <= 2:
                    continue
                out[name] = self.kind.out(a)
                continue
            if name in ("k_cmp_compressed", "v_cmp_compressed", "dq", "dk", "dv", "dgates", "dgate_x") \
                    or name in _FWD_PER_TOKEN or name.startswith(("dk_", "dv_")):
                out[name] = self.unpack(name, a)
            else:
                out[name] = self.kind.out(a)
        return out


def _split_kwargs(k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, gate_x, gate_w, gate_b, gate_w0, gate_b0):
    return dict(k_cmp=k_cmp, v_cmp=v_cmp, k_slc=k_slc, v_slc=v_slc, k_win=k_win, v_win=v_win, gates=gates,
                gate_x=gate_x, gate_w=gate_w, gate_b=gate_b, gate_w0=gate_w0, gate_b0=gate_b0)


def _require_cuda(what: str) -> None:
    if not _nsa.cuda_built:
        raise ValueError(f"device = cuda: nsa.{what} was built without the CUDA path (it is built only where nvcc "
                         "is found, see README 'CUDA')")


_CUDA_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def forward(q, k, v, *, k_cmp=None, v_cmp=None, k_slc=None, v_slc=None, k_win=None, v_win=None, gates=None,
            gate_x=None, gate_w=None, gate_b=None, gate_w0=None, gate_b0=None, gate_act="gelu", cu_seqlens=None,
            cmp_len=32, cmp_stride=16, slc_len=64, slc_count=16, window=512, init_blocks=1, local_blocks=2,
            compress="mlp", compress_params=None, cmp_hidden=0, cmp_act="gelu", seed=0, scale=None,
            path="fast", allow_nonfinite=False) -> Result:
    """The NSA forward pass (`nsa forward`): every output and intermediate, named as its files.

    CPU inputs run the reference in their dtype; CUDA tensors run the CUDA path with their dtype
    as operand precision (the command's --dtype) and return float32 results, as its files.
    """
    settings = _settings(cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks, compress,
                         cmp_hidden, cmp_act, scale)
    tensors = _split_kwargs(k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, gate_x, gate_w, gate_b, gate_w0, gate_b0)
    call = _Call(q, k, v, tensors, _load_params(compress_params, compress), cu_seqlens)
    if call.kind.cuda:
        _require_cuda("forward")
        d = _nsa.cuda_forward(settings, call.arrays, call.cu, int(seed), gate_act, _CUDA_DTYPES[call.kind.dtype],
                              call.kind.device.index or 0)
    else:
        fn = _nsa.forward_f64 if call.kind.dtype == "float64" else _nsa.forward_f32
        d = fn(settings, call.arrays, call.cu, int(seed), gate_act, path, bool(allow_nonfinite))
    return call.result(d)


def backward(q, k, v, do, *, k_cmp=None, v_cmp=None, k_slc=None, v_slc=None, k_win=None, v_win=None, gates=None,
             gate_x=None, gate_w=None, gate_b=None, gate_w0=None, gate_b0=None, gate_act="gelu", cu_seqlens=None,
             cmp_len=32, cmp_stride=16, slc_len=64, slc_count=16, window=512, init_blocks=1, local_blocks=2,
             compress="mlp", compress_params=None, cmp_hidden=0, cmp_act="gelu", seed=0, scale=None,
             path="fast", allow_nonfinite=False, deterministic=False) -> Result:
    """The NSA backward pass (`nsa backward --do`): gradients named as its files (dq, dk_cmp, ..., dk, dv,
    dgates, d<phi parameter>, dgate_*). Selected blocks are held fixed (NSA-SPEC.md 7)."""
    settings = _settings(cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks, compress,
                         cmp_hidden, cmp_act, scale)
    tensors = _split_kwargs(k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, gate_x, gate_w, gate_b, gate_w0, gate_b0)
    if do is None:
        raise TypeError("do: required (dL/do, shaped like the output o)")
    tensors["do"] = do
    call = _Call(q, k, v, tensors, _load_params(compress_params, compress), cu_seqlens, extra_per_token=("do",))
    dO = call.arrays.pop("do")
    if call.kind.cuda:
        _require_cuda("backward")
        d = _nsa.cuda_backward(settings, call.arrays, dO, call.cu, int(seed), gate_act,
                               _CUDA_DTYPES[call.kind.dtype], call.kind.device.index or 0, bool(deterministic))
    else:
        fn = _nsa.backward_f64 if call.kind.dtype == "float64" else _nsa.backward_f32
        d = fn(settings, call.arrays, dO, call.cu, int(seed), gate_act, path, bool(allow_nonfinite))
    return call.result(d)


def full_attention(q, k, v, *, cu_seqlens=None, scale=None, path="fast", allow_nonfinite=False) -> Result:
    """Full causal attention with the same GQA layout (`nsa full`): o and lse. CPU only, as the command."""
    call = _Call(q, k, v, {}, {}, cu_seqlens)
    if call.kind.cuda:
        raise ValueError("full_attention runs on the CPU only, as `nsa full`; give CPU arrays")
    fn = _nsa.full_f64 if call.kind.dtype == "float64" else _nsa.full_f32
    return call.result(fn(dict(q=call.arrays["q"], k=call.arrays["k"], v=call.arrays["v"]), float(scale or 0.0),
                          call.cu, path, bool(allow_nonfinite)))


def compress_params(Hkv: int, dk: int, dv: int, *, compress="mlp", cmp_len=32, cmp_hidden=0, seed=0,
                    dtype="float64", like=None) -> Dict[str, Any]:
    """phi's parameters as the reference draws them from `seed` (what `nsa forward --seed` uses), named
    as the --compress-params files. `like`: a tensor whose kind, dtype and device the arrays take."""
    settings = _settings(cmp_len, 16 if cmp_len >= 16 else 1, 64, 16, 512, 1, 2, compress, cmp_hidden, "gelu", None)
    if like is not None:
        dtype = _dtype_name(like)
        if dtype not in ("float64", "float32"):
            dtype = "float32"
    if dtype not in ("float64", "float32"):
        raise TypeError(f"dtype = {dtype!r}, expected float64 or float32")
    fn = _nsa.compress_params_f64 if dtype == "float64" else _nsa.compress_params_f32
    d = fn(settings, int(Hkv), int(dk), int(dv), int(seed))
    if like is not None and _is_torch(like):
        import torch
        return {n: torch.from_numpy(a).to(device=like.device, dtype=like.dtype) for n, a in d.items()}
    return d


# ---- Comparison (`nsa compare`) --------------------------------------------------------------------

class CompareReport:
    """The report of `nsa compare`: one line per tensor, then PASS or FAIL. True when everything passed."""

    def __init__(self, lines: List[str], passed: bool, files: int):
        self.lines, self.passed, self.compared = lines, passed, files

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        tail = [f"{self.compared} files compared"] if self.compared > 1 else []
        return "\n".join(self.lines + tail + ["PASS" if self.passed else "FAIL"])

    __repr__ = __str__


def _cmp_array(x: Any) -> np.ndarray:
    if _is_torch(x):
        import torch
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()  # exact: every bf16/fp16 value is a float32
        return x.cpu().numpy()
    return np.asarray(x)


def compare(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-8, metric: str = "allclose",
            tie_tol: float = 1e-3, block_scores: Any = None, label: str = "array",
            tolerances: Optional[Mapping[str, Mapping[str, float]]] = None) -> CompareReport:
    """`nsa compare A B` on arrays: `actual` against the reference `expected`, two arrays or two results
    (dicts / Result) name by name, as two folders. Float arrays pass when every |a - b| <= atol + rtol|b|
    (metric "allclose") or ||a - b|| / ||b|| <= rtol ("rel_l2"); NaN never passes; integer arrays must be
    equal, except that rows of block_idx may select other blocks at near-ties of `expected`'s
    block_scores (within tie_tol of the n-th score). `tolerances` overrides rtol/atol/metric/tie_tol per
    name. Returns a CompareReport (falsy on FAIL); nsa.testing.assert_matches_reference raises with it."""
    def one(name, a, b, scores, over):
        t = dict(rtol=rtol, atol=atol, metric=metric, tie_tol=tie_tol)
        t.update(over or {})
        ok, line, _, _ = _nsa.compare_arrays(name, _cmp_array(a), _cmp_array(b), float(t["rtol"]), float(t["atol"]),
                                             float(t["tie_tol"]), str(t["metric"]), name.startswith("block_idx"),
                                             None if scores is None else _cmp_array(scores))
        return ok, line
    if isinstance(actual, Mapping) != isinstance(expected, Mapping):
        raise TypeError("compare two arrays or two results (dicts of arrays), not one of each")
    if not isinstance(actual, Mapping):
        ok, line = one(label, actual, expected, block_scores, None)
        return CompareReport([line], ok, 1)
    names = sorted(n for n, x in actual.items() if x is not None)
    if not names:
        raise ValueError("compare: the actual result holds no arrays")
    lines, passed, compared = [], True, 0
    for n in names:
        if expected.get(n) is None:
            lines.append(f"FAIL {n}  missing in the expected result")
            passed = False
            continue
        ok, line = one(n, actual[n], expected[n], expected.get("block_scores") if n == "block_idx" else None,
                       (tolerances or {}).get(n))
        lines.append(line)
        passed = passed and ok
        compared += 1
    return CompareReport(lines, passed, max(compared, 2))


# ---- Decoding with a KV cache (NSA-SPEC.md 8) ------------------------------------------------------

class DecodeCache:
    """The reference's KV cache (reference/decode.hpp) for `batch` sequences of up to `capacity` tokens.

    `cache.prefill(q, k, v, ...)` runs the forward pass on prompts (packed with cu_seqlens, one per
    listed empty sequence) and fills the cache; `nsa.decode_step(cache, q, k, v, ...)` appends one
    token per stepped sequence ([Bs, H, D]) and returns its outputs, equal to the prefill's at that
    position. Branches listed in `own_kv` ("k_cmp", "v_win", ...) take keys/values of their own.
    device="cuda" keeps the cache on the GPU (cuda::Decoder; dtype bfloat16 or float16, CUDA tensors in,
    float32 results on the device); device="cpu" is the reference's (float64 or float32 arrays).
    """

    def __init__(self, batch: int, capacity: int, *, Hq: int, Hkv: int, dk: int, dv: int, dtype="float64",
                 device="cpu", own_kv: Sequence[str] = (), cmp_len=32, cmp_stride=16, slc_len=64, slc_count=16,
                 window=512, init_blocks=1, local_blocks=2, compress="mlp", compress_params=None, cmp_hidden=0,
                 cmp_act="gelu", seed=0, scale=None, gate_act="gelu"):
        self.cuda = str(device).startswith("cuda")
        allowed = tuple(_CUDA_DTYPES) if self.cuda else ("float64", "float32")
        if dtype not in allowed:
            raise TypeError(f"dtype = {dtype!r}: a cache on {device} holds {', '.join(allowed)}")
        for n in own_kv:
            if n not in _BRANCH_KV:
                raise ValueError(f"own_kv: '{n}' is not one of: {', '.join(_BRANCH_KV)}")
        self.dtype, self.device, self.own_kv = dtype, device, tuple(own_kv)
        self.settings = _settings(cmp_len, cmp_stride, slc_len, slc_count, window, init_blocks, local_blocks,
                                  compress, cmp_hidden, cmp_act, scale)
        # One zero token fixes the head layout and the sharing; phi comes from compress_params or the seed.
        host = "float32" if self.cuda else dtype
        z = lambda H, D: np.zeros((1, int(H), int(D)), dtype=host)
        arrays = dict(q=z(Hq, dk), k=z(Hkv, dk), v=z(Hkv, dv))
        for n in own_kv:
            arrays[n] = z(Hkv, dk if n[0] == "k" else dv)
        for n, a in _load_params(compress_params, compress).items():
            arrays[n] = np.ascontiguousarray(_cmp_array(a).astype(host))
        if self.cuda:
            _require_cuda("DecodeCache")
            index = int(str(device).split(":")[1]) if ":" in str(device) else 0
            self._c = _nsa.CudaDecodeCache(self.settings, arrays, int(batch), int(capacity), int(seed), gate_act,
                                           _CUDA_DTYPES[dtype], index)
        else:
            cls = _nsa.DecodeCacheF64 if dtype == "float64" else _nsa.DecodeCacheF32
            self._c = cls(self.settings, arrays, int(batch), int(capacity), int(seed), gate_act)

    @property
    def lengths(self) -> List[int]:
        """Tokens held per sequence."""
        return list(self._c.lengths)

    def _call(self, q, k, v, tensors, cu_seqlens):
        call = _Call(q, k, v, tensors, {}, cu_seqlens)
        if call.kind.cuda != self.cuda or call.kind.dtype != self.dtype:
            raise TypeError(f"q: {call.kind.dtype} on {_device_name(q)}; this cache holds {self.dtype} on "
                            f"{self.device}")
        if call.batch:
            raise ValueError(f"q: rank 4 {list(q.shape)}; the cache takes packed [N, H, D] rows")
        return call

    def prefill(self, q, k, v, *, cu_seqlens=None, seqs=None, **tensors) -> Result:
        """The forward pass on prompts (as nsa.forward) that also fills the cache of the listed empty sequences."""
        call = self._call(q, k, v, tensors, cu_seqlens)
        return call.result(self._c.prefill(call.arrays, call.cu, list(seqs or [])))

    def step(self, q, k, v, *, seqs=None, **tensors) -> Result:
        """nsa.decode_step(self, ...)."""
        call = self._call(q, k, v, tensors, None)
        return call.result(self._c.step(call.arrays, list(seqs or [])))


def decode_step(cache: DecodeCache, q, k, v, *, seqs=None, **tensors) -> Result:
    """One decode step: row b of q, k, v ([Bs, H, D], and gates, per-branch k/v) is appended to sequence
    seqs[b] (default: all, in order); returns its outputs (o, o_cmp, ..., block_idx, pos), which equal the
    forward pass's at that position (NSA-SPEC.md 8)."""
    return cache.step(q, k, v, seqs=seqs, **tensors)


from . import testing  # noqa: E402  (uses the names above)


def __getattr__(name: str) -> Any:
    # nsa.torch on first use, so that `import nsa` does not import PyTorch.
    if name == "torch":
        import importlib
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'nsa' has no attribute '{name}'")
