"""Validating a kernel against the reference in one line:

    nsa.testing.assert_matches_reference(my_kernel(q, k, v, g), q, k, v, gates=g, slc_count=16)

The reference runs in float64 on the CPU on the very values given (bf16/fp16/fp32 inputs are exact
in float64), and each output is compared by `nsa compare`'s rules with the tolerance below for the
outputs' precision (the CUDA tests' tolerances, tests/tolerances.hpp): relative L2 error for the
float tensors, equality for block_idx except at near-ties of the reference's block scores.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

import nsa

# Unit roundoff of each operand precision.
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}


def default_tolerances(precision: str) -> Dict[str, Dict[str, float]]:
    """Per-output tolerances for a kernel computing with `precision` operands and fp32 accumulation.

    Each bound is c * u + floor (u: the unit roundoff; c counts the roundings on the way to the
    quantity, with a margin of ~2; floor: the same computation entirely in fp32), as in
    tests/tolerances.hpp: compressed K/V and the branch outputs c = 4 (floor 1e-5), lse c = 2 (1e-6),
    block scores c = 8 (1e-5), the selection's near-tie band the same as the scores'; gates 1e-5.
    The metric is relative L2 (||a - b|| / ||b||).
    """
    if precision not in UNIT_ROUNDOFF:
        raise ValueError(f"precision = {precision!r}, expected one of: {', '.join(UNIT_ROUNDOFF)}")
    u = UNIT_ROUNDOFF[precision]
    attn = dict(rtol=4 * u + 1e-5, metric="rel_l2")
    lse = dict(rtol=2 * u + 1e-6, metric="rel_l2")
    scores = dict(rtol=8 * u + 1e-5, metric="rel_l2")
    tol = {n: attn for n in ("o", "o_cmp", "o_slc", "o_win", "k_cmp_compressed", "v_cmp_compressed")}
    tol.update({n: lse for n in ("lse_cmp", "lse_slc", "lse_win")})
    tol["block_scores"] = scores
    tol["block_idx"] = dict(tie_tol=8 * u + 1e-5)
    tol["gates"] = dict(rtol=1e-5, metric="rel_l2")
    return tol


def _precision_of(outputs: Mapping[str, Any]) -> str:
    x = outputs.get("o", next(iter(outputs.values())))
    name = str(getattr(x, "dtype", "float64")).replace("torch.", "")
    return name if name in UNIT_ROUNDOFF else "float32"


def _as_float64(x: Any) -> Any:
    if x is None:
        return None
    if nsa._is_torch(x):
        return x.detach().to(device="cpu", dtype=__import__("torch").float64)
    a = np.asarray(x)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def assert_matches_reference(fn_outputs: Any, q: Any, k: Any, v: Any, *, precision: Optional[str] = None,
                             tolerances: Optional[Mapping[str, Mapping[str, float]]] = None, **config: Any) -> nsa.CompareReport:
    """Raises AssertionError with `nsa compare`'s report unless `fn_outputs` matches nsa.forward.

    fn_outputs: the tested kernel's output `o` (an array), or a dict of any of nsa.forward's outputs by
    name (o, o_cmp, lse_slc, block_idx, ...). q, k, v and `config` (gates, compress_params, cmp_len,
    slc_count, ... as nsa.forward takes them) describe the computation. `precision` (default: the
    dtype of fn_outputs' o) picks the tolerances (default_tolerances); `tolerances` overrides them per
    name. Returns the report when it passes.
    """
    outputs = fn_outputs if isinstance(fn_outputs, Mapping) else {"o": fn_outputs}
    tol = default_tolerances(precision or _precision_of(outputs))
    for name, t in (tolerances or {}).items():
        tol[name] = {**tol.get(name, {}), **t}
    inputs = {n: _as_float64(x) if n not in ("cu_seqlens", "compress_params") and hasattr(x, "dtype") else x
              for n, x in config.items()}
    params = inputs.get("compress_params")
    if isinstance(params, Mapping):
        inputs["compress_params"] = {n: _as_float64(x) for n, x in params.items()}
    ref = nsa.forward(_as_float64(q), _as_float64(k), _as_float64(v), **inputs)
    unknown = sorted(set(outputs) - set(ref))
    if unknown:
        raise ValueError(f"fn_outputs: '{unknown[0]}' is not an output of nsa.forward ({', '.join(ref)})")
    expected = {n: ref[n] for n in outputs}
    if "block_idx" in outputs:
        expected["block_scores"] = ref["block_scores"]
    report = nsa.compare(dict(outputs), expected, tolerances=tol)
    if not report:
        raise AssertionError("the outputs do not match the reference (nsa compare's rules):\n" + str(report))
    return report
