# nsa on PyTorch tensors: identical to NumPy, the custom operator's gradients (gradcheck in double,
# equal to `nsa backward`'s files), torch.compile(fullgraph=True), the module training on the CPU.
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (python/requirements.txt)")

import nsa  # noqa: E402
import nsa.torch  # noqa: E402
from conftest import SMALL, assert_same, cli_options, workload  # noqa: E402

TINY = dict(cmp_len=4, cmp_stride=2, slc_len=8, slc_count=3, init_blocks=1, local_blocks=1, window=8)


def as_torch(w, requires_grad=False):
    return {n: torch.from_numpy(a.copy()).requires_grad_(requires_grad) for n, a in w.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_equals_numpy(dtype):
    w = workload(T=70, dtype=dtype)
    t = as_torch(w)
    a = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)
    b = nsa.forward(t["q"], t["k"], t["v"], gates=t["gates"], **SMALL)
    assert isinstance(b.o, torch.Tensor) and b.o.dtype == getattr(torch, np.dtype(dtype).name)
    assert_same({n: a[n] for n in a}, {n: x.numpy() for n, x in b.items()})
    do = np.random.default_rng(3).standard_normal(a.o.shape).astype(dtype)
    ga = nsa.backward(w["q"], w["k"], w["v"], do, gates=w["gates"], **SMALL)
    gb = nsa.backward(t["q"], t["k"], t["v"], torch.from_numpy(do), gates=t["gates"], **SMALL)
    assert_same({n: ga[n] for n in ga}, {n: x.numpy() for n, x in gb.items()})
    # Batches too.
    wb = workload(T=40, batch=2, dtype=dtype)
    tb = as_torch(wb)
    assert_same({n: x for n, x in nsa.forward(wb["q"], wb["k"], wb["v"], **SMALL).items()},
                {n: x.numpy() for n, x in nsa.forward(tb["q"], tb["k"], tb["v"], **SMALL).items()})


def test_outputs_share_memory_with_the_reference():
    # Zero-copy out: the torch result wraps the reference's buffer (no copy is made on the way back).
    w = as_torch(workload(T=40))
    r = nsa.forward(w["q"], w["k"], w["v"], **SMALL)
    assert r.o.is_contiguous() and r.o.data_ptr() % 64 == 0  # the reference's 64-byte aligned storage


def tiny_inputs(compress="mlp", seed=0, dtype=torch.float64):
    w = as_torch(workload(T=24, Hq=2, Hkv=1, dk=4, dv=4, seed=seed))
    phi = {n: torch.from_numpy(a).to(dtype).requires_grad_(True)
           for n, a in nsa.compress_params(1, 4, 4, compress=compress, cmp_len=4, seed=seed).items()}
    for n in ("q", "k", "v"):
        w[n] = w[n].to(dtype).requires_grad_(True)
    # Gates kept inside (0.05, 0.95): gradcheck's steps must not leave [0, 1].
    w["gates"] = (0.05 + 0.9 * w["gates"]).to(dtype).requires_grad_(True)
    return w, phi


@pytest.mark.parametrize("compress", ["mlp", "linear", "mean"])
def test_gradcheck_double(compress):
    w, phi = tiny_inputs(compress)
    names = list(phi)

    def f(q, k, v, g, *p):
        return nsa.torch.attention(q, k, v, g, dict(zip(names, p)) or None, compress=compress, **TINY)

    # The selection is discrete and held fixed: the data must not sit at a near-tie that a step of
    # 1e-6 flips (random normal data at T = 24 does not). Every entry of every input is checked.
    args = (w["q"], w["k"], w["v"], w["gates"], *phi.values())
    threads = nsa.set_threads(1)  # tiny sizes: one thread is 8x faster here than two contending ones
    try:
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    finally:
        nsa.set_threads(threads)


def test_gradients_equal_cli_backward(cli, tmp_path):
    w, phi = tiny_inputs("mlp", seed=1)
    folder = tmp_path / "phi"
    folder.mkdir()
    for n, p in phi.items():
        np.save(folder / f"{n}.npy", p.detach().numpy())
    o = nsa.torch.attention(w["q"], w["k"], w["v"], w["gates"], phi, **TINY)
    do = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (o * do).sum().backward()
    files = cli.run("backward", {n: w[n].detach().numpy() for n in ("q", "k", "v", "gates")} | {"do": do.numpy()},
                    cli_options(TINY) + ["--compress-params", str(folder)])
    got = {"dq": w["q"].grad, "dk": w["k"].grad, "dv": w["v"].grad, "dgates": w["gates"].grad}
    got |= {"d" + n: p.grad for n, p in phi.items()}
    assert_same(files, {n: g.numpy() for n, g in got.items()}, names=sorted(got))
    fwd = cli.run("forward", {n: w[n].detach().numpy() for n in ("q", "k", "v", "gates")},
                  cli_options(TINY) + ["--compress-params", str(folder)])
    assert_same(fwd, {"o": o.detach().numpy()}, names=["o"])


def test_torch_compile_fullgraph():
    w, phi = tiny_inputs("mlp", seed=2, dtype=torch.float32)

    def step(q, k, v, g, p):
        o = nsa.torch.attention(q, k, v, g, p, **TINY)
        return (o * o).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(w["q"], w["k"], w["v"], w["gates"], phi)
    loss_c.backward()
    grads_c = [x.grad.clone() for x in (w["q"], w["gates"], phi["w1_k"])]
    for x in (w["q"], w["k"], w["v"], w["gates"], *phi.values()):
        x.grad = None
    loss_e = step(w["q"], w["k"], w["v"], w["gates"], phi)
    loss_e.backward()
    assert torch.equal(loss_c, loss_e)
    for a, b in zip(grads_c, (w["q"].grad, w["gates"].grad, phi["w1_k"].grad)):
        assert torch.equal(a, b)
    # The operator's fake implementation alone (what fullgraph tracing runs), on meta tensors.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(3, 24, 2, 4)
        kv = torch.empty(3, 24, 1, 6)
        out = nsa.torch.attention(q, torch.empty(3, 24, 1, 4), kv, None, **TINY)
        assert out.shape == (3, 24, 2, 6)
    torch.library.opcheck(torch.ops.nsa.attention.default,
                          (w["q"].detach(), w["k"].detach(), w["v"].detach(), w["gates"].detach(),
                           [p.detach() for p in phi.values()], None, 4, 2, 8, 3, 8, 1, 1, "mlp", 0, "gelu", 0.0, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_module_trains_on_cpu():
    torch.manual_seed(0)
    T, Hq, Hkv, D, dm = 64, 4, 2, 8, 16
    m = nsa.torch.NativeSparseAttention(Hq, Hkv, D, D, dm, cmp_len=8, cmp_stride=4, slc_len=16, slc_count=3,
                                        window=16, seed=1)
    assert sorted(n for n, _ in m.named_parameters()) == sorted(list(nsa.PHI_NAMES["mlp"]) + ["gate_b", "gate_w"])
    # The drawn phi is the reference's draw for the seed, rounded to float32.
    drawn = nsa.compress_params(Hkv, D, D, cmp_len=8, seed=1)
    assert np.array_equal(m.w1_k.detach().numpy(), drawn["w1_k"].astype(np.float32))
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    x = torch.randn(T, dm)
    target = torch.randn(T, Hq, D) * 0.5
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = ((m(q, k, v, x) - target) ** 2).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_torch_bad_inputs():
    w = as_torch(workload(T=40))
    with pytest.raises(TypeError, match="q: dtype bfloat16 on the CPU"):
        nsa.forward(w["q"].bfloat16(), w["k"].bfloat16(), w["v"].bfloat16(), **SMALL)
    with pytest.raises(TypeError, match="k: a ndarray, but q is a PyTorch tensor"):
        nsa.forward(w["q"], w["k"].numpy(), w["v"], **SMALL)
    with pytest.raises(ValueError, match="compress_params: 'pe_k' is missing"):
        nsa.torch.attention(w["q"], w["k"], w["v"], None, {"w1_k": w["q"]}, **SMALL)
    with pytest.raises(ValueError, match=r"cmp_stride \(d\) = 40"):
        nsa.torch.NativeSparseAttention(4, 2, 16, 8, 8, cmp_stride=40)
    # A non-contiguous tensor is copied, not refused: the same result.
    qt = w["q"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous()
    assert torch.equal(nsa.forward(qt, w["k"], w["v"], **SMALL).o, nsa.forward(w["q"], w["k"], w["v"], **SMALL).o)
