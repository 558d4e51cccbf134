#!/usr/bin/env python3
"""Merges the benchmark outputs of one device call (scripts/device.sh) into the committed results
file experiments/results/<gpu>-<yyyymmdd>.json ({"device", "date", "command", "records"}) and
prints the summary table: NSA against cuDNN SDPA per shape, and the selection stage's rate.

With --base FILE (the committed results file of the day), the new records are added to the base's:
a new record replaces a base record of the same (op, impl, T, B, dk, dv, dtype), the others stay,
and the base's device, date and command are kept (the new command is appended to "more_commands").
Decode records ("op": "decode") get their own table: NSA step latency, bytes, rate against the
measured copy bandwidth and the traffic model, and SDPA decode timed in the same call.

usage: merge_results.py --command CMD --out results.json bench*.json sdpa.json [peers.json]
       merge_results.py --base experiments/results/h100-<date>.json --command CMD --out results.json
                        bench_decode.json sdpa_decode.json
"""
import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--command", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", help="results file whose records are kept (same-key records are replaced)")
    args = ap.parse_args()
    records, device, ceilings = [], None, {}
    for path in args.inputs:
        try:
            d = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"merge_results: skipping {path}: {e}")
            continue
        device = device or d.get("device")
        if "ceilings" in d:
            ceilings = d["ceilings"]
        for r in d.get("records", []):
            r.setdefault("source", path.split("/")[-1])
            records.append(r)
        # Public NSA kernels (/work/shared/tools/peers_bench.py rows): their forward lines, at the
        # shapes that script fixes (B = 1, Hq = 64, Hkv = 4, d = 128, bf16, n = 16, l' = 64).
        for r in d.get("rows", []):
            name = r.get("name", "")
            if r.get("T") and name.endswith("_fwd") and ("nsa" in name or "slc" in name):
                records.append({"op": "forward", "impl": name, "T": r["T"], "B": 1, "Hq": 64, "Hkv": 4, "dk": 128,
                                "dv": 128, "dtype": "bf16", "ms": r["ms"], "source": path.split("/")[-1],
                                "note": "public Triton NSA kernel, no window branch"})
    out = {"device": device, "date": time.strftime("%Y-%m-%d"), "command": args.command, "ceilings": ceilings,
           "records": records}
    if args.base:
        base = json.load(open(args.base))
        key = lambda r: tuple(r.get(k) for k in ("op", "impl", "T", "B", "dk", "dv", "dtype"))
        new_keys = {key(r) for r in records}
        kept = [r for r in base.get("records", []) if key(r) not in new_keys]
        out = dict(base)
        out["records"] = kept + records
        out["more_commands"] = base.get("more_commands", []) + [args.command]
    json.dump(out, open(args.out, "w"), indent=1)
    decode_table(records)

    def find(impl, T, dk, dv, op="forward"):
        for r in records:
            if (r.get("impl") == impl and r.get("T") == T and r.get("dk") == dk and r.get("dv") == dv and r.get("ms")
                    and r.get("op", "forward") == op):
                return r
        return None

    print(f"\n== {device}; measured ceilings: {ceilings}")
    print(f"{'dk/dv':>7} {'T':>6} | {'nsa_cuda ms':>11} {'TFLOP/s':>7} | {'cuDNN ms':>9} {'flash ms':>9} | "
          f"{'vs cuDNN':>8} {'vs flash':>8} | {'slc stage TFLOP/s (% of matmul)':>31} | stages ms")
    for r in records:
        if r.get("impl") != "nsa_cuda" or r.get("op", "forward") != "forward":
            continue
        T, dk, dv = r["T"], r["dk"], r["dv"]
        cu, fl = find("sdpa_cudnn", T, dk, dv), find("sdpa_flash", T, dk, dv)
        slc = next((s for s in r.get("stages", []) if s["stage"] == "slc_attn"), None)
        st = " ".join(f"{s['stage']}={s['ms']:.2f}" for s in r.get("stages", []))
        print(f"{dk:>3}/{dv:<3} {T:>6} | {r['ms']:>11.3f} {r['tflops']:>7.0f} | "
              f"{cu['ms'] if cu else float('nan'):>9.3f} {fl['ms'] if fl else float('nan'):>9.3f} | "
              f"{(cu['ms'] / r['ms']) if cu else float('nan'):>7.2f}x {(fl['ms'] / r['ms']) if fl else float('nan'):>7.2f}x | "
              f"{(slc['tflops'] if slc else float('nan')):>20.0f} ({(slc['pct_of_ceiling'] if slc else float('nan')):>4.0f}%)"
              f"     | {st}")
    fb = [r for r in records if r.get("op") == "forward_backward" and r.get("impl") == "nsa_cuda"]
    if fb:
        print(f"\n{'dk/dv':>7} {'T':>6} | {'fwd+bwd ms':>10} {'det. ms':>8} {'fwd ms':>7} {'bwd ms':>7} {'bwd/fwd':>7} | "
              f"{'cuDNN f+b':>9} {'flash f+b':>9} | {'vs cuDNN':>8} {'vs flash':>8} | backward stages ms")
    for r in fb:
        T, dk, dv = r["T"], r["dk"], r["dv"]
        det = find("nsa_cuda_deterministic", T, dk, dv, "forward_backward")
        cu = find("sdpa_cudnn", T, dk, dv, "forward_backward")
        fl = find("sdpa_flash", T, dk, dv, "forward_backward")
        st = " ".join(f"{s['stage']}={s['ms']:.2f}" for s in r.get("backward_stages", []))
        nan = float("nan")
        print(f"{dk:>3}/{dv:<3} {T:>6} | {r['ms']:>10.2f} {det['ms'] if det else nan:>8.2f} {r['forward_ms']:>7.2f} "
              f"{r['backward_ms']:>7.2f} {r['backward_over_forward']:>7.2f} | {cu['ms'] if cu else nan:>9.2f} "
              f"{fl['ms'] if fl else nan:>9.2f} | {(cu['ms'] / r['ms']) if cu else nan:>7.2f}x "
              f"{(fl['ms'] / r['ms']) if fl else nan:>7.2f}x | {st}")
    peers = [r for r in records if r.get("op", "forward") == "forward" and
             r.get("impl") not in ("nsa_cuda", "nsa_cuda_deterministic", "sdpa_cudnn", "sdpa_flash")]
    for r in peers:
        print(f"peer {r.get('impl')}: T={r.get('T')} {r.get('ms')} ms")


def decode_table(records):
    """The decode records: NSA's step against SDPA decode at the same cache length and batch."""
    nsa = [r for r in records if r.get("op") == "decode" and r.get("impl") == "nsa_cuda"]
    if not nsa:
        return

    def sdpa(impl, r):
        for x in records:
            if (x.get("op") == "decode" and x.get("impl") == impl and x.get("T") == r["T"] and x.get("B") == r["B"]
                    and x.get("dk") == r["dk"] and x.get("dv") == r["dv"] and x.get("ms")):
                return x
        return None

    print(f"\n== decode step (us; median, L2 flushed); bytes = what the step must read (traffic model); "
          f"copy ceiling {nsa[0].get('copy_tbps', float('nan')):.2f} TB/s")
    print(f"nsa us: {nsa[0].get('timing', 'eager')} launches (eager: the kernels launched one by one)")
    print(f"{'s':>6} {'B':>3} | {'nsa us':>8} {'eager':>8} {'emit us':>8} {'mean us':>8} | {'MB':>7} {'TB/s':>5} {'%copy':>5} "
          f"{'model us':>8} | {'sdpa us':>8} {'backend':>9} {'x sdpa':>6} | {'flash':>8} {'effic.':>8} {'cudnn':>8}")
    for r in nsa:
        d = sdpa("sdpa", r)
        f, e, c = sdpa("sdpa_flash", r), sdpa("sdpa_efficient", r), sdpa("sdpa_cudnn", r)
        us = lambda x: f"{1e3 * x['ms']:8.1f}" if x else f"{'n/a':>8}"
        print(f"{r['T']:>6} {r['B']:>3} | {1e3 * r['ms']:8.1f} {1e3 * r.get('ms_eager', r['ms']):8.1f} "
              f"{1e3 * r['ms_emit']:8.1f} {1e3 * r['ms_mean']:8.1f} | "
              f"{r['bytes'] / 1e6:7.1f} {r['tbps']:5.2f} {r['pct_of_copy']:5.0f} {1e3 * r['model_ms_at_copy']:8.1f} | "
              f"{us(d)} {(d or {}).get('backend', 'n/a'):>9} {(d['ms'] / r['ms']) if d else float('nan'):6.2f} | "
              f"{us(f)} {us(e)} {us(c)}")


if __name__ == "__main__":
    main()
