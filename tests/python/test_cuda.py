# The CUDA path through PyTorch tensors against the reference: forward, backward, decode, the
# zero-copy operator on the current stream and its capture in a CUDA graph. Skipped, with the
# reason, where the extension has no CUDA path or no GPU is usable (run by scripts/device_python.sh
# on the GPU machine).
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (python/requirements.txt)")

import nsa  # noqa: E402
import nsa.torch  # noqa: E402
from nsa.testing import UNIT_ROUNDOFF  # noqa: E402


def _why_not():
    if not nsa._nsa.cuda_built:
        return "the extension was built without the CUDA path (no nvcc at build time)"
    why = nsa._nsa.cuda_unavailable_reason()
    if why:
        return why  # cuda::available says what is missing ("no usable CUDA device: ...")
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "CUDA available")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The paper's block settings; head dims the tensor-core kernels are built for (NSA_CUDA_DIMS=paper).
PAPER = dict(cmp_len=32, cmp_stride=16, slc_len=64, slc_count=16, window=512)


def inputs(T, Hq, Hkv, dk, dv, dtype, seed=0, batch=0):
    """CUDA tensors of `dtype`, and the same values in float64 on the CPU (exact), with phi's
    parameters drawn by the reference and rounded as the device stores them (weight matrices in the
    operand precision, pe and biases in fp32)."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch, T) if batch else (T,)
    cpu = dict(q=torch.randn(*lead, Hq, dk, generator=g), k=torch.randn(*lead, Hkv, dk, generator=g),
               v=torch.randn(*lead, Hkv, dv, generator=g))
    cpu = {n: x.to(dtype).double() for n, x in cpu.items()}
    cpu["gates"] = torch.rand(*lead, Hq, 3, generator=g).float().double()
    phi = nsa.compress_params(Hkv, dk, dv, cmp_len=PAPER["cmp_len"], seed=seed)
    phi = {n: torch.from_numpy(a).to(dtype if n.startswith("w") else torch.float32).double() for n, a in phi.items()}
    dev = {n: x.to("cuda", dtype if n != "gates" else torch.float32) for n, x in cpu.items()}
    dev_phi = {n: p.to("cuda", torch.float32) for n, p in phi.items()}
    return dev, dev_phi, cpu, phi


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("T", [1000, 4097])
def test_forward_matches_reference(dtype, T):
    dev, dev_phi, cpu, phi = inputs(T, 16, 1, 128, 128, dtype)
    r = nsa.forward(dev["q"], dev["k"], dev["v"], gates=dev["gates"].to(dtype), compress_params=dev_phi, **PAPER)
    assert r.o.is_cuda and r.o.dtype == torch.float32  # the command's files are float32 too
    prec = str(dtype).replace("torch.", "")
    nsa.testing.assert_matches_reference(dict(r), cpu["q"], cpu["k"], cpu["v"], gates=cpu["gates"].to(dtype).double(),
                                         compress_params=phi, precision=prec, **PAPER)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_backward_matches_reference(dtype):
    dev, dev_phi, cpu, phi = inputs(777, 8, 2, 128, 128, dtype, seed=1)
    do = torch.randn(777, 8, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    gates = cpu["gates"].to(dtype)
    g = nsa.backward(dev["q"], dev["k"], dev["v"], do.cuda(), gates=gates.cuda(), compress_params=dev_phi, **PAPER)
    ref = nsa.backward(cpu["q"], cpu["k"], cpu["v"], do.double(), gates=gates.double(), compress_params=phi, **PAPER)
    tol = 8 * UNIT_ROUNDOFF[str(dtype).replace("torch.", "")] + 5e-5  # tests/tolerances.hpp grad_tol
    # The keys' phi biases have zero gradient in exact arithmetic (each query's dS sums to zero over
    # its keys): their relative error is not meaningful and they are left out, as in the C++ tests.
    names = [n for n in ref if n not in ("db1_k", "db2_k", "db_k")]
    assert set(names) <= set(g)
    for n in names:
        assert g[n].is_cuda
        assert rel_l2(g[n], ref[n]) <= tol, f"{n}: rel_l2 {rel_l2(g[n], ref[n]):.3g} > {tol:.3g}"


def test_decode_matches_reference():
    dtype = torch.bfloat16
    dev, dev_phi, cpu, phi = inputs(300, 16, 1, 128, 128, dtype, seed=2)
    gates = cpu["gates"].to(dtype)
    full = nsa.forward(cpu["q"], cpu["k"], cpu["v"], gates=gates.double(), compress_params=phi, **PAPER)
    cache = nsa.DecodeCache(1, 320, Hq=16, Hkv=1, dk=128, dv=128, dtype="bfloat16", device="cuda",
                            compress_params={n: p.float() for n, p in phi.items()}, **PAPER)
    P = 200
    pre = cache.prefill(dev["q"][:P], dev["k"][:P], dev["v"][:P], gates=gates[:P].cuda())
    tol = nsa.testing.default_tolerances("bfloat16")
    assert rel_l2(pre.o, full.o[:P]) <= tol["o"]["rtol"]
    for t in range(P, 300):
        s = nsa.decode_step(cache, dev["q"][t:t + 1], dev["k"][t:t + 1], dev["v"][t:t + 1], gates=gates[t:t + 1].cuda())
        assert int(s.pos[0]) == t
        assert rel_l2(s.o[0], full.o[t]) <= tol["o"]["rtol"], f"step {t}"
    assert cache.lengths == [300]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_operator_zero_copy_matches_reference(dtype):
    dev, dev_phi, cpu, phi = inputs(2000, 16, 1, 128, 128, dtype, seed=3, batch=2)
    for x in dev.values():
        x.requires_grad_(True)
    params = {n: torch.nn.Parameter(p) for n, p in dev_phi.items()}
    o = nsa.torch.attention(dev["q"], dev["k"], dev["v"], dev["gates"], params, **PAPER)
    assert o.is_cuda and o.dtype == dtype and o.shape == (2, 2000, 16, 128)
    prec = str(dtype).replace("torch.", "")
    nsa.testing.assert_matches_reference(o, cpu["q"], cpu["k"], cpu["v"], gates=cpu["gates"], compress_params=phi,
                                         precision=prec, **PAPER)
    # The operator's gradients (the CUDA backward) against the reference's.
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    (o.float() * do.cuda().float()).sum().backward()
    ref = nsa.backward(cpu["q"], cpu["k"], cpu["v"], do.double(), gates=cpu["gates"], compress_params=phi, **PAPER)
    tol = 8 * UNIT_ROUNDOFF[prec] + 5e-5
    for name, x in (("dq", dev["q"]), ("dk", dev["k"]), ("dv", dev["v"]), ("dgates", dev["gates"]),
                    ("dw1_v", params["w1_v"])):
        assert rel_l2(x.grad, ref[name]) <= tol, f"{name}: {rel_l2(x.grad, ref[name]):.3g}"


def test_operator_runs_on_the_current_stream_and_in_a_cuda_graph():
    dtype = torch.bfloat16
    dev, dev_phi, _, _ = inputs(3000, 16, 1, 128, 128, dtype, seed=4)
    args = (dev["q"], dev["k"], dev["v"], dev["gates"], dev_phi)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = nsa.torch.attention(*args, **PAPER)  # also makes the plan: nothing is allocated during capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = nsa.torch.attention(*args, **PAPER)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # New values in the same memory: the replay reads them.
    dev["q"].copy_(torch.flip(dev["q"], dims=[0]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, nsa.torch.attention(*args, **PAPER))
    assert not torch.equal(captured, eager)


def test_cuda_bad_inputs():
    dev, dev_phi, _, _ = inputs(100, 4, 1, 128, 128, torch.bfloat16)
    with pytest.raises(TypeError, match="k: dtype float16, but q is bfloat16"):
        nsa.torch.attention(dev["q"], dev["k"].half(), dev["v"], None, dev_phi, **PAPER)
    with pytest.raises(ValueError, match="k: on cpu, but q is on cuda:0"):
        nsa.torch.attention(dev["q"], dev["k"].cpu(), dev["v"], None, dev_phi, **PAPER)
    with pytest.raises(TypeError, match="q: dtype float64 on cuda:0"):
        nsa.forward(dev["q"].double(), dev["k"].double(), dev["v"].double(), **PAPER)
    with pytest.raises(ValueError, match="head counts"):
        nsa.torch.attention(dev["q"][:, :3], dev["k"].expand(100, 2, 128), dev["v"].expand(100, 2, 128), None,
                            None, **PAPER)
