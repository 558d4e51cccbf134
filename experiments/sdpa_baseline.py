#!/usr/bin/env python3
"""Full causal attention through PyTorch's SDPA (cuDNN and flash backends) on the shapes of
`nsa bench --device cuda`: the baseline NSA is compared against, timed in the same device call
(scripts/device.sh). Writes records in the results schema of experiments/results/*.json.

Timing: CUDA events around each call, the median of --reps after --warmup calls, the L2 cache
flushed (a 256 MiB buffer zeroed) before every repeat, random N(0, 1) bf16 inputs. GQA runs with
enable_gqa=True where the backend takes it, else with K/V expanded to Hq heads before timing
(the record says which).

With --backward, also forward + backward (op "forward_backward"): the output's gradient dL/do
~ N(0, 1) given, dq, dk, dv by torch.autograd.grad (no accumulation into .grad), timed together
with the forward in one call; FLOPs counted as the forward's 3.5x (FlashAttention's convention:
the backward is 2.5x the forward).

With --decode: one decode step, i.e. one query token per sequence attending over a cache of
--T + 1 keys (the new token's included), for each --batch; q [B, Hq, 1, dk], k/v [B, Hkv, s + 1, d]
(GQA native, enable_gqa=True). Timed through PyTorch's default dispatch ("impl": "sdpa", with the
backend it picked: the kernels a profiled call launched) and each backend forced in turn
(sdpa_flash, sdpa_efficient, sdpa_cudnn; a backend that refuses the shape is recorded with its
error). Records "op": "decode", with the K/V bytes the step reads and the achieved rate.

usage: sdpa_baseline.py --T 8192,16384 --dims 128:128,192:128 [--backward] --out sdpa.json
       sdpa_baseline.py --decode --T 8192,65536 --batch 1,16,64 --out sdpa_decode.json
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, warmup, reps, flush):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def picked_backend(fn):
    """The SDPA backend a call dispatches to, from the names of the kernels it launches."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = sorted({e.name for e in prof.events()
                        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA})
    except Exception as e:  # the profiler is not essential to the timing
        return "unknown", [repr(e)[:200]]
    joined = " ".join(names).lower()
    if "cudnn" in joined or "sm90_flash" in joined or "cudnn_generated" in joined:
        kind = "cudnn"
    elif "flash" in joined:
        kind = "flash"
    elif "fmha" in joined or "cutlass" in joined or "efficient" in joined:
        kind = "efficient"
    else:
        kind = "math" if names else "unknown"
    return kind, [n[:160] for n in names]


def decode(args, flush, dev):
    records = []
    choices = [("sdpa", None), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
               ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
    dims = [tuple(int(x) for x in d.split(":")) for d in args.dims.split(",")]
    for dk, dv in dims:
        for T in (int(x) for x in args.T.split(",")):
            for B in (int(x) for x in args.batch.split(",")):
                torch.manual_seed(T + B)
                kv = T + 1
                q = torch.randn(B, args.Hq, 1, dk, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(B, args.Hkv, kv, dk, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(B, args.Hkv, kv, dv, device="cuda", dtype=torch.bfloat16)
                kv_bytes = float(B) * kv * args.Hkv * (dk + dv) * 2
                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                for impl, be in choices:
                    rec = {"op": "decode", "impl": impl, "T": T, "kv_len": kv, "B": B, "Hq": args.Hq,
                           "Hkv": args.Hkv, "dk": dk, "dv": dv, "dtype": "bf16", "reps": args.reps,
                           "warmup": args.warmup, "l2_flushed": True, "gqa": "native", "bytes": kv_bytes}
                    try:
                        if be is None:
                            fn()
                            torch.cuda.synchronize()
                            ms = median_ms(fn, args.warmup, args.reps, flush)
                            rec["backend"], rec["kernels"] = picked_backend(fn)
                        else:
                            with sdpa_kernel([be]):
                                fn()
                                torch.cuda.synchronize()
                                ms = median_ms(fn, args.warmup, args.reps, flush)
                        rec.update({"ms": ms, "tbps": kv_bytes / ms / 1e9})
                    except Exception as e:  # the backend refuses this shape
                        rec.update({"ms": None, "error": repr(e).splitlines()[0][:300]})
                        torch.cuda.synchronize()
                    records.append(rec)
                    ms = rec["ms"]
                    print(f"decode {impl:14s} s={T:6d} B={B:2d} bf16 dk={dk} dv={dv}  "
                          + (f"median {1e3 * ms:9.1f} us ({args.reps} reps, L2 flushed) {rec['tbps']:5.2f} TB/s"
                             + (f"  backend={rec['backend']}" if be is None else "")
                             if ms is not None else f"not run: {rec['error']}"), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    json.dump({"device": dev, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "torch": torch.__version__, "records": records}, open(args.out, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="8192,16384,32768,65536")
    ap.add_argument("--dims", default="128:128,192:128", help="dk:dv pairs")
    ap.add_argument("--Hq", type=int, default=64)
    ap.add_argument("--Hkv", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--out", required=True)
    ap.add_argument("--decode", action="store_true", help="one decode step per --batch and cache length --T")
    ap.add_argument("--batch", default="1,16,64", help="decode: sequences per step")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    if args.decode:
        decode(args, flush, dev)
        return
    records = []
    backends = [("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)]
    for dims in args.dims.split(","):
        dk, dv = (int(x) for x in dims.split(":"))
        for T in (int(x) for x in args.T.split(",")):
            torch.manual_seed(T)
            q = torch.randn(1, args.Hq, T, dk, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, args.Hkv, T, dk, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, args.Hkv, T, dv, device="cuda", dtype=torch.bfloat16)
            G = args.Hq // args.Hkv
            flop = 2.0 * (dk + dv) * args.Hq * T * (T + 1) / 2  # useful: causal, q.k and p.v
            reps = args.reps if T <= 16384 else max(3, args.reps // 2)
            do = torch.randn(1, args.Hq, T, dv, device="cuda", dtype=torch.bfloat16)
            for op in ("forward", "forward_backward") if args.backward else ("forward",):
                bwd = op == "forward_backward"
                for impl, be in backends:
                    rec = {"op": op, "impl": impl, "T": T, "B": 1, "Hq": args.Hq, "Hkv": args.Hkv, "dk": dk,
                           "dv": dv, "dtype": "bf16", "reps": reps, "warmup": args.warmup, "l2_flushed": True}
                    err = None
                    for gqa in ("native", "expanded"):
                        try:
                            with sdpa_kernel([be]):
                                if gqa == "native":
                                    qq, kk, vv = q, k, v
                                else:
                                    kk = k.repeat_interleave(G, 1).contiguous()
                                    vv = v.repeat_interleave(G, 1).contiguous()
                                    qq = q
                                if bwd:
                                    qq, kk, vv = (x.detach().requires_grad_() for x in (qq, kk, vv))

                                def fn(qq=qq, kk=kk, vv=vv, gqa=gqa, bwd=bwd):
                                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True,
                                                                       enable_gqa=gqa == "native")
                                    if bwd:
                                        torch.autograd.grad(o, (qq, kk, vv), do)

                                fn()
                                torch.cuda.synchronize()
                                ms = median_ms(fn, args.warmup, reps, flush)
                            fl = flop * (3.5 if bwd else 1.0)
                            rec.update({"ms": ms, "gflop": fl / 1e9, "tflops": fl / ms / 1e9, "gqa": gqa})
                            err = None
                            break
                        except Exception as e:  # the backend refuses this shape: try the other GQA form
                            err = repr(e).splitlines()[0][:300]
                            torch.cuda.synchronize()
                    if err:
                        rec.update({"ms": None, "error": err})
                    records.append(rec)
                    ms = rec["ms"]
                    print(f"{op} {impl:11s} T={T:6d} bf16 dk={dk} dv={dv}  "
                          + (f"median {ms:9.3f} ms ({reps} reps, L2 flushed) {rec['tflops']:5.0f} TFLOP/s  "
                             f"gqa={rec['gqa']}" if ms is not None else f"not run: {err}"), flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()
    json.dump({"device": dev, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "torch": torch.__version__, "records": records}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
