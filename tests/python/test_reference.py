# nsa.forward / backward / full_attention / compare / decode on NumPy arrays against the `nsa`
# command's files on the same inputs (bit for bit), and the bad inputs.
import re

import numpy as np
import pytest

import nsa
from conftest import SMALL, assert_same, cli_options, workload


@pytest.mark.parametrize("dtype,precision", [(np.float64, "double"), (np.float32, "float")])
def test_forward_equals_cli(cli, dtype, precision):
    w = workload(dtype=dtype)
    files = cli.run("forward", w, cli_options(SMALL) + ["--seed", "3", "--precision", precision])
    r = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], seed=3, **SMALL)
    assert sorted(r) == sorted(files)
    assert_same(files, r)
    assert r.o.dtype == dtype and isinstance(r.o, np.ndarray)


def test_forward_batch_and_packed_equal_cli(cli):
    w = workload(T=70, batch=2)
    files = cli.run("forward", w, cli_options(SMALL))
    r = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)
    assert r.o.shape == (2, 70, 4, 8) and r.k_cmp_compressed.shape[0] == 2
    assert_same(files, r)
    # The same two sequences packed, of unequal lengths.
    p = workload(T=130, seed=1)
    cu = np.array([0, 50, 130], dtype=np.int64)
    files = cli.run("forward", dict(p, cu_seqlens=cu), cli_options(SMALL))
    r = nsa.forward(p["q"], p["k"], p["v"], gates=p["gates"], cu_seqlens=cu, **SMALL)
    assert "cu_seqlens_cmp" in files
    assert_same(files, r)


@pytest.mark.parametrize("compress", ["mean", "linear", "mlp"])
def test_compress_params_and_per_branch_kv_equal_cli(cli, compress, tmp_path):
    w = workload(T=90, Hq=2, Hkv=1, dk=8, dv=16, seed=2)
    rng = np.random.default_rng(5)
    w["k_slc"] = rng.standard_normal(w["k"].shape)
    w["v_win"] = rng.standard_normal(w["v"].shape)
    opts = cli_options(dict(SMALL, compress=compress))
    params = None
    if compress != "mean":
        params = nsa.compress_params(1, 8, 16, compress=compress, cmp_len=8, seed=11)
        assert sorted(params) == sorted(nsa.PHI_NAMES[compress])
        params = {n: a * 1.5 for n, a in params.items()}  # not what --seed draws
        folder = tmp_path / "phi"
        folder.mkdir()
        for n, a in params.items():
            np.save(folder / f"{n}.npy", a)
        opts += ["--compress-params", str(folder)]
    files = cli.run("forward", w, opts)
    r = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], k_slc=w["k_slc"], v_win=w["v_win"],
                    compress=compress, compress_params=params, **{k: v for k, v in SMALL.items()})
    assert_same(files, r)
    if compress != "mean":  # the folder itself, as the command reads it
        r2 = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], k_slc=w["k_slc"], v_win=w["v_win"],
                         compress=compress, compress_params=str(tmp_path / "phi"), **SMALL)
        assert_same(files, r2)


def test_compress_params_are_the_seeds_draw(cli):
    w = workload(T=40, Hq=2, Hkv=1, dk=8, dv=8)
    drawn = nsa.compress_params(1, 8, 8, cmp_len=8, seed=7)
    a = nsa.forward(w["q"], w["k"], w["v"], seed=7, **SMALL)
    b = nsa.forward(w["q"], w["k"], w["v"], compress_params=drawn, **SMALL)
    assert_same({n: b[n] for n in b}, a)
    c = nsa.forward(w["q"], w["k"], w["v"], seed=8, **SMALL)
    assert not np.array_equal(a.k_cmp_compressed, c.k_cmp_compressed)


def test_gate_mlp_equals_cli(cli):
    w = workload(T=60, gates=False)
    rng = np.random.default_rng(9)
    g = dict(gate_x=rng.standard_normal((60, 12)), gate_w=rng.standard_normal((12, 12)) * 0.3,
             gate_b=rng.standard_normal(12) * 0.1)
    files = cli.run("forward", dict(w, **g), cli_options(SMALL))
    r = nsa.forward(w["q"], w["k"], w["v"], **g, **SMALL)
    assert_same(files, r)
    do = rng.standard_normal(r.o.shape)
    files = cli.run("backward", dict(w, **g, do=do), cli_options(SMALL))
    gr = nsa.backward(w["q"], w["k"], w["v"], do, **g, **SMALL)
    assert "dgate_w" in gr and sorted(gr) == sorted(files)
    assert_same(files, gr)


@pytest.mark.parametrize("dtype,precision", [(np.float64, "double"), (np.float32, "float")])
def test_backward_equals_cli(cli, dtype, precision):
    w = workload(dtype=dtype, seed=4)
    do = np.random.default_rng(1).standard_normal(w["q"].shape[:-1] + (8,)).astype(dtype)
    files = cli.run("backward", dict(w, do=do), cli_options(SMALL) + ["--precision", precision])
    g = nsa.backward(w["q"], w["k"], w["v"], do, gates=w["gates"], **SMALL)
    assert sorted(g) == sorted(files)
    assert {"dq", "dk", "dv", "dgates", "dw1_k", "dpe_v"} <= set(g)
    assert_same(files, g)


def test_full_attention_equals_cli(cli):
    w = workload(T=80, gates=False)
    files = cli.run("full", w, ["--scale", "0.3"])
    r = nsa.full_attention(w["q"], w["k"], w["v"], scale=0.3)
    assert sorted(r) == ["lse", "o"]
    assert_same(files, r)


def test_decode_steps_equal_prefill():
    w = workload(T=75, seed=6)
    full = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], seed=2, **SMALL)
    cache = nsa.DecodeCache(1, 80, Hq=4, Hkv=2, dk=16, dv=8, seed=2, **SMALL)
    P = 40
    pre = cache.prefill(w["q"][:P], w["k"][:P], w["v"][:P], gates=w["gates"][:P])
    assert cache.lengths == [P]
    np.testing.assert_allclose(pre.o, full.o[:P], rtol=1e-12, atol=1e-12)
    for t in range(P, 75):
        s = nsa.decode_step(cache, w["q"][t:t + 1], w["k"][t:t + 1], w["v"][t:t + 1], gates=w["gates"][t:t + 1])
        assert list(s.pos) == [t]
        np.testing.assert_allclose(s.o[0], full.o[t], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.lse_cmp[0], full.lse_cmp[t], rtol=1e-12, atol=1e-12)
        assert np.array_equal(s.block_idx[0], full.block_idx[t])
    assert cache.lengths == [75]
    with pytest.raises(MemoryError, match="capacity"):
        for t in range(10):
            cache.step(w["q"][:1], w["k"][:1], w["v"][:1])


def test_compare_same_lines_as_cli(cli):
    w = workload(T=100)
    a = nsa.forward(w["q"], w["k"], w["v"], **SMALL)
    b = nsa.forward(w["q"].astype(np.float32), w["k"].astype(np.float32), w["v"].astype(np.float32), **SMALL)
    for metric, rtol in (("allclose", 1e-5), ("rel_l2", 1e-7), ("rel_l2", 1e-3)):
        opts = ["--rtol", str(rtol), "--metric", metric]
        p = cli.run("compare", {}, opts, positional=[cli.save("o_f32", b.o), cli.save("o_f64", a.o)], check=False)
        rep = nsa.compare(b.o, a.o, rtol=rtol, metric=metric, label=p.stdout.split()[1])
        assert str(rep).splitlines() == p.stdout.splitlines()
        assert bool(rep) == (p.returncode == 0)
    # Integer arrays: equal, or another block at a near-tie only.
    idx = a.block_idx.copy()
    assert nsa.compare(idx, a.block_idx)
    t, g = 99, 0  # 7 valid blocks, 4 selected
    chosen = set(idx[t, g][idx[t, g] >= 0])
    other = next(j for j in range(int(a.block_scores.shape[-1])) if j not in chosen and j <= t // 16)
    idx[t, g, -1] = other
    idx[t, g] = np.sort(idx[t, g])
    rep = nsa.compare(idx, a.block_idx, block_scores=a.block_scores, label="block_idx")
    assert not rep and "is not a near-tie" in str(rep)
    assert nsa.compare(idx, a.block_idx, block_scores=a.block_scores, tie_tol=1e9, label="block_idx")
    # Two results, name by name, as two folders.
    rep = nsa.compare(b, a, rtol=1e-3, metric="rel_l2")
    assert rep, str(rep)
    assert "files compared" in str(rep) and str(rep).endswith("PASS")


def test_assert_matches_reference():
    w = workload(T=64, dtype=np.float32)
    r = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)
    outs = {n: r[n] for n in ("o", "o_cmp", "lse_slc", "block_idx", "k_cmp_compressed")}
    rep = nsa.testing.assert_matches_reference(outs, w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)
    assert "PASS o " in str(rep)
    bad = dict(outs, o=outs["o"] * 1.01)
    with pytest.raises(AssertionError, match=r"FAIL o  shape \[64, 4, 8\].*rel_l2 0.01"):
        nsa.testing.assert_matches_reference(bad, w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)
    with pytest.raises(AssertionError, match="FAIL o "):  # a different setting is caught
        nsa.testing.assert_matches_reference(r.o, w["q"], w["k"], w["v"], gates=w["gates"], **dict(SMALL, window=8))


def test_noncontiguous_inputs_are_copied():
    w = workload(T=50)
    qt = np.ascontiguousarray(np.swapaxes(w["q"], 0, 1))
    view = np.swapaxes(qt, 0, 1)  # the same values, not C-contiguous
    assert not view.flags.c_contiguous
    assert_same(nsa.forward(w["q"], w["k"], w["v"], **SMALL), nsa.forward(view, w["k"], w["v"], **SMALL))


def test_threads_do_not_change_results():
    w = workload(T=90)
    n = nsa.set_threads(1)
    a = nsa.forward(w["q"], w["k"], w["v"], **SMALL)
    nsa.set_threads(0)
    b = nsa.forward(w["q"], w["k"], w["v"], **SMALL)
    assert n == 1
    assert_same({k: v for k, v in a.items()}, b)


# ---- Bad inputs: ValueError / TypeError with the command's messages, never a crash ----------------

def bad(**over):
    w = workload(T=40)
    w.update(over)
    return w


@pytest.mark.parametrize("change,exc,message", [
    (dict(q=np.zeros((40, 4, 16), np.int32)), TypeError, "q: dtype int32 on the CPU; the reference computes in float64 or float32"),
    (dict(q=np.zeros((40, 4, 16), np.float16)), TypeError, "bfloat16 and float16 run on CUDA tensors"),
    (dict(k=np.zeros((40, 2, 16), np.float32)), TypeError, "k: dtype float32, but q is float64"),
    (dict(k=np.zeros((40, 3, 16))), ValueError, "head counts: q has Hq = 4 query heads, k has Hkv = 3"),
    (dict(v=np.zeros((39, 2, 8))), ValueError, "v: shape [39, 2, 8], expected [40, 2, 8]"),
    (dict(gates=np.full((40, 4, 3), 2.0)), ValueError, "gates: value 2 at index [0, 0, 0]"),
    (dict(q=np.full((40, 4, 16), np.nan)), ValueError, "q: non-finite value nan at index [0, 0, 0]"),
    (dict(q=np.zeros((4, 16))), ValueError, "q: rank 2 (shape [4, 16]), expected [T, Hq, dk] or [B, T, Hq, dk]"),
    (dict(q=[[[1.0]]]), TypeError, "q: a list, expected a NumPy array or a PyTorch tensor"),
])
def test_bad_inputs(change, exc, message):
    w = bad(**change)
    with pytest.raises(exc, match=re.escape(message)):
        nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)


@pytest.mark.parametrize("settings,message", [
    (dict(cmp_stride=40), r"cmp_stride \(d\) = 40"),
    (dict(slc_count=2, init_blocks=1, local_blocks=2), "init_blocks"),
    (dict(compress="max"), "compress = 'max' is not one of: mean, linear, mlp"),
    (dict(cmp_act="tanh"), "cmp_act: "),
    (dict(window=0), "window"),
])
def test_bad_settings_same_message_as_cli(cli, settings, message):
    w = workload(T=40)
    with pytest.raises(ValueError, match=message) as e:
        nsa.forward(w["q"], w["k"], w["v"], **dict(SMALL, **settings))
    p = cli.run("forward", w, cli_options(dict(SMALL, **settings)), check=False)
    assert p.returncode != 0
    assert str(e.value).split(": ")[-1] in p.stderr, (str(e.value), p.stderr)


def test_bad_cu_seqlens_and_params():
    w = workload(T=40)
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0 and end at N = 40"):
        nsa.forward(w["q"], w["k"], w["v"], cu_seqlens=[0, 30], **SMALL)
    with pytest.raises(ValueError, match="cu_seqlens is for packed"):
        b = workload(T=20, batch=2)
        nsa.forward(b["q"], b["k"], b["v"], cu_seqlens=[0, 20, 40], **SMALL)
    p = nsa.compress_params(2, 16, 8, cmp_len=8)
    del p["w2_v"]
    with pytest.raises(ValueError, match="compress_params: 'w2_v' is missing"):
        nsa.forward(w["q"], w["k"], w["v"], compress_params=p, **SMALL)
    p = nsa.compress_params(2, 16, 8, cmp_len=8)
    p["pe_k"] = p["pe_k"][:, :4]
    with pytest.raises(ValueError, match=r"pe_k: shape \[2, 4, 16\], expected \[2, 8, 16\]"):
        nsa.forward(w["q"], w["k"], w["v"], compress_params=p, **SMALL)
    with pytest.raises(ValueError, match="'w_k' is not a parameter of compress = mlp"):
        nsa.forward(w["q"], w["k"], w["v"], compress_params={"w_k": p["pe_k"]}, **SMALL)
    with pytest.raises(ValueError, match="compress = mean has no parameters"):
        nsa.forward(w["q"], w["k"], w["v"], compress="mean", compress_params={"pe_k": p["pe_k"]}, **SMALL)
    with pytest.raises(ValueError, match="do: shape"):
        nsa.backward(w["q"], w["k"], w["v"], np.zeros((40, 4, 16)), **SMALL)
    with pytest.raises(ValueError, match="metric = 'max' is not one of: allclose, rel_l2"):
        nsa.compare(w["q"], w["q"], metric="max")


def test_edge_cases_do_not_crash():
    z = np.zeros
    r = nsa.forward(z((0, 4, 16)), z((0, 2, 16)), z((0, 2, 8)), **SMALL)  # no tokens: empty outputs
    assert r.o.shape == (0, 4, 8) and r.block_idx.shape == (0, 2, 4)
    r = nsa.forward(z((1, 4, 16)), z((1, 2, 16)), z((1, 2, 8)), **SMALL)  # one token: no compressed block
    assert r.k_cmp_compressed.shape == (0, 2, 16) and np.all(r.lse_cmp == -np.inf)
    with pytest.raises(TypeError, match=re.escape("do: required (dL/do, shaped like the output o)")):
        nsa.backward(z((5, 4, 16)), z((5, 2, 16)), z((5, 2, 8)), None, **SMALL)
    with pytest.raises(ValueError, match=re.escape("q: shape [5, 0, 16] has Hq = 0 heads")):
        nsa.forward(z((5, 0, 16)), z((5, 2, 16)), z((5, 2, 8)), **SMALL)
    with pytest.raises(TypeError, match="cu_seqlens: float64 of rank 1, expected int"):
        nsa.forward(z((5, 4, 16)), z((5, 2, 16)), z((5, 2, 8)), cu_seqlens=[0.5, 5], **SMALL)
    with pytest.raises(ValueError, match=re.escape("batch = 0 is invalid: expected >= 1")):
        nsa.DecodeCache(0, 10, Hq=4, Hkv=2, dk=16, dv=8)
    rep = nsa.compare(z(3), z(4))
    assert not rep and str(rep) == "FAIL array  shape [3] vs [4]\nFAIL"


class _Foreign:
    """A minimal DLPack producer standing for another framework's CPU array (JAX, CuPy host arrays)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_other_frameworks_through_dlpack():
    w = workload(T=50)
    a = nsa.forward(*(_Foreign(w[n]) for n in ("q", "k", "v")), gates=_Foreign(w["gates"]), **SMALL)
    b = nsa.forward(w["q"], w["k"], w["v"], gates=w["gates"], **SMALL)
    assert isinstance(a.o, np.ndarray)
    assert_same({n: b[n] for n in b}, a)
