#!/usr/bin/env python3
"""Markdown tables of a results file (the README's tables come from here).

usage: python3 experiments/report.py RESULTS.json --table forward|forward_backward|decode|cpu

RESULTS.json is a file that `nsa bench` wrote (bench.json) or that experiments/merge_results.py
merged (experiments/results/*.json): {"device", "command", "records": [...]}. Every number printed
is read from the records; ratios are formed from records of the same file (the same device call
for the GPU files, the same run for the CPU file). Standard library only.
"""
import argparse
import json
import sys


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def ratio(base, x):
    return None if base is None or x is None or x == 0 else base / x


def xfmt(r):
    return "n/a" if r is None else f"{r:.2f}x"


def times(base, x):
    """base / x as "1.23x", or n/a."""
    return xfmt(ratio(base, x))


def peer_name(impl):
    return "fla NSA" if impl.startswith("fla") else "XunhaoLai NSA" if impl.startswith("xunhaolai") else impl


def ktok(T):
    return f"{T // 1024}k" if T % 1024 == 0 else str(T)


def index(records, op):
    """(impl, dk, dv, T, B) -> record, for the records of one op."""
    out = {}
    for r in records:
        if r.get("op") == op and r.get("ms") is not None:
            out[(r["impl"], r.get("dk"), r.get("dv"), r.get("T"), r.get("B", 1))] = r
    return out


def table_forward(recs):
    ix = index(recs, "forward")
    keys = sorted({(dk, dv, T) for (impl, dk, dv, T, B) in ix if impl == "nsa_cuda"})
    peers = sorted({impl for (impl, *_rest) in ix if impl.startswith(("fla", "xunhaolai"))})
    head = ["dk/dv", "T", "nsa_cuda ms", "TFLOP/s", "model ms", "cuDNN SDPA ms", "flash SDPA ms", "vs cuDNN",
            "vs flash"]
    head += [f"{peer_name(p)} ms (no window)" for p in peers]
    rows = []
    for dk, dv, T in keys:
        n = ix[("nsa_cuda", dk, dv, T, 1)]
        c = ix.get(("sdpa_cudnn", dk, dv, T, 1))
        f = ix.get(("sdpa_flash", dk, dv, T, 1))
        cm, fm = (c or {}).get("ms"), (f or {}).get("ms")
        row = [f"{dk}/{dv}", ktok(T), fmt(n["ms"]), fmt(n.get("tflops"), 0), fmt(n.get("model_ms")), fmt(cm), fmt(fm),
               times(cm, n["ms"]), times(fm, n["ms"])]
        row += [fmt(ix.get((p, dk, dv, T, 1), {}).get("ms")) for p in peers]
        rows.append(row)
    return head, rows


def table_forward_backward(recs):
    ix = index(recs, "forward_backward")
    keys = sorted({(dk, dv, T) for (impl, dk, dv, T, B) in ix if impl == "nsa_cuda"})
    head = ["dk/dv", "T", "fwd+bwd ms", "deterministic ms", "fwd ms", "bwd ms", "bwd / fwd", "cuDNN SDPA f+b ms",
            "flash SDPA f+b ms", "vs cuDNN", "vs flash"]
    rows = []
    for dk, dv, T in keys:
        n = ix[("nsa_cuda", dk, dv, T, 1)]
        det = ix.get(("nsa_cuda_deterministic", dk, dv, T, 1), {}).get("ms")
        cm = ix.get(("sdpa_cudnn", dk, dv, T, 1), {}).get("ms")
        fm = ix.get(("sdpa_flash", dk, dv, T, 1), {}).get("ms")
        rows.append([f"{dk}/{dv}", ktok(T), fmt(n["ms"], 1), fmt(det, 1), fmt(n.get("forward_ms")),
                     fmt(n.get("backward_ms"), 1), xfmt(n.get("backward_over_forward")), fmt(cm, 1), fmt(fm, 1),
                     times(cm, n["ms"]), times(fm, n["ms"])])
    return head, rows


def table_decode(recs):
    ix = index(recs, "decode")
    # The default split kernel's record per (T, B): the one without an explicit override when the
    # file has several versions, else the fastest listed version.
    nsa = {}
    for (impl, dk, dv, T, B), r in ix.items():
        if impl != "nsa_cuda":
            continue
        best = nsa.get((T, B))
        if best is None or r["ms"] < best["ms"]:
            nsa[(T, B)] = r
    head = ["cache s", "batch", "nsa_cuda us", "fastest SDPA us (backend)", "vs SDPA", "MB read (model)",
            "model us at copy rate", "% of copy rate", "step emitting a row us"]
    rows = []
    for (T, B) in sorted(nsa):
        n = nsa[(T, B)]
        dk, dv = n.get("dk"), n.get("dv")
        # The baseline: the fastest SDPA of the call, PyTorch's default dispatch ("sdpa", which
        # records the backend it picked) or a backend forced ("sdpa_<backend>").
        sdpa = [(r["ms"], r.get("backend") if impl == "sdpa" else impl[len("sdpa_"):] + ", forced")
                for (impl, rdk, rdv, rT, rB), r in ix.items()
                if impl.startswith("sdpa") and (rdk, rdv, rT, rB) == (dk, dv, T, B) and r.get("ms")]
        sm, backend = min(sdpa) if sdpa else (None, "?")
        rows.append([ktok(T), str(B), fmt(n["ms"] * 1e3, 1), f"{fmt(sm * 1e3 if sm else None, 1)} ({backend})",
                     times(sm, n["ms"]), fmt(n.get("bytes", 0) / 1e6, 1),
                     fmt(n.get("model_ms_at_copy", 0) * 1e3, 1), fmt(n.get("pct_of_copy"), 0),
                     fmt(n.get("ms_emit", 0) * 1e3, 1)])
    return head, rows


def table_cpu(recs):
    ix = {}
    for r in recs:
        ix[(r["op"], r["impl"], r["T"], r["dtype"])] = r
    keys = sorted({(dt, T) for (op, impl, T, dt) in ix if impl == "nsa_cpu"}, key=lambda k: (k[0] != "fp32", k[1]))
    head = ["precision", "T", "NSA fwd ms", "% of GEMM rate", "full fwd ms", "NSA vs full (fwd)", "NSA bwd ms",
            "bwd / fwd", "full bwd ms", "NSA vs full (bwd)"]
    rows = []
    for dt, T in keys:
        f = ix[("forward", "nsa_cpu", T, dt)]
        ff = ix.get(("forward", "full_cpu", T, dt), {})
        b = ix.get(("backward", "nsa_cpu", T, dt), {})
        fb = ix.get(("backward", "full_cpu", T, dt), {})
        rows.append([dt, ktok(T), fmt(f["ms"], 0), fmt(f.get("pct_of_ceiling"), 0), fmt(ff.get("ms"), 0),
                     xfmt(f.get("speedup_vs_full")), fmt(b.get("ms"), 0),
                     xfmt(b.get("backward_over_forward")), fmt(fb.get("ms"), 0),
                     xfmt(b.get("speedup_vs_full"))])
    return head, rows


TABLES = {"forward": table_forward, "forward_backward": table_forward_backward, "decode": table_decode,
          "cpu": table_cpu}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results JSON (bench.json or experiments/results/*.json)")
    ap.add_argument("--table", required=True, choices=sorted(TABLES))
    a = ap.parse_args()
    try:
        with open(a.results) as f:
            data = json.load(f)
        recs = data["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"report.py: {a.results}: cannot read a results file with a 'records' list ({e})")
    head, rows = TABLES[a.table](recs)
    if not rows:
        sys.exit(f"report.py: {a.results}: no records for table '{a.table}'")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
