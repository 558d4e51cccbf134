#!/usr/bin/env python3
"""The simulator's validation (scripts/validate_simulator.sh): Nsight Compute's counters of the
selection kernel against `nsa simulate` on the same selection. The standard library only.

  --device-args REPLAY_JSON NCU_CSV   prints the `nsa simulate` options of what the device reports:
                                      its SM count and the CTAs per SM Nsight Compute measured (the
                                      least of the launch__occupancy_limit_* metrics)
  --l2-mb REPLAY_JSON [--half]        prints the device's L2 in MiB (or half of it); nothing if unknown
  --collect DIR --cases a,b --out F.json --table F.md
                                      the results file (records of measured and predicted bytes, the
                                      ratios) and a markdown table
  --table-from F.json                 prints the table of a results file
"""
import argparse
import csv
import datetime
import io
import json
import os
import sys

import math

SECTOR = 32
TOLERANCE = 0.15  # the bar: within 15% of the counters


def read_ncu(path):
    """The first kernel row of an `ncu --csv --page raw --print-units base` log, as {metric: float}."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no CSV table (did ncu profile a kernel?)")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, data = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
    if not data:
        raise ValueError(f"{path}: no kernel row")
    out = {}
    for k, v in zip(header, data[0]):
        try:
            out[k] = float(v.replace(",", ""))
        except ValueError:
            out[k] = v
    return out


def device_args(replay_path, ncu_path):
    args = []
    try:
        rep = json.load(open(replay_path))
        args += ["--sms", str(rep["sms"])]
        ctas = rep.get("ctas_per_sm_smem", 0)
    except (OSError, ValueError, KeyError):
        return ""
    try:
        m = read_ncu(ncu_path)
        limits = [m[k] for k in m if k.startswith("launch__occupancy_limit_") and isinstance(m[k], float)]
        if limits:
            ctas = int(min(limits))
    except (OSError, ValueError):
        pass
    if ctas > 0:
        args += ["--ctas-per-sm", str(ctas)]
    return " ".join(args)


def predicted(sim_json):
    """The selection branch of a `nsa simulate` simulate.json."""
    s = json.load(open(sim_json))
    res = s["results"][0]
    b = next(x for x in res["branches"] if x["branch"] == "slc")
    st = b["streams"]
    return {
        "hbm_read_bytes": b["hbm_read_bytes"],
        "hbm_read_stderr": b["hbm_read_stderr"],
        "hbm_write_bytes": b["hbm_write_bytes"],
        "l2_read_bytes": b["l2_read_bytes"],
        "sector_read_hit_rate": b["sector_read_hit_rate"],
        "kv_l2_read_bytes": st.get("k", {}).get("l2_read_bytes", 0) + st.get("v", {}).get("l2_read_bytes", 0),
        "kv_hbm_read_bytes": st.get("k", {}).get("hbm_read_bytes", 0) + st.get("v", {}).get("hbm_read_bytes", 0),
        "q_hbm_read_bytes": st.get("q", {}).get("hbm_read_bytes", 0),
        "formula_bytes": b["formula_bytes"],
        "predicted_ms": b["predicted_ms"],
        "bound": b["bound"],
        "l2_bytes": s["gpu"]["l2_bytes"],
        "ctas_per_sm": res["ctas_per_sm"],
        "sample": res["sample"],
        "seconds": res["seconds"],
    }


def collect(args):
    records = []
    device = None
    for case in args.cases.split(","):
        sel, T = case.rsplit("_", 1)
        rec = {"case": case, "selection": sel, "T": int(T)}
        try:
            m = read_ncu(os.path.join(args.collect, f"ncu_{case}.csv"))
            rep = json.load(open(os.path.join(args.collect, f"replay_{case}.json")))
            device = device or rep["device"]
            meas = {
                "dram_read_bytes": m.get("dram__bytes_read.sum"),
                "dram_write_bytes": m.get("dram__bytes_write.sum"),
                "l2_read_bytes": m.get("lts__t_sectors_srcunit_tex_op_read.sum", math.nan) * SECTOR,
                "l2_read_hit_bytes": m.get("lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum", math.nan) * SECTOR,
                "l2_read_miss_bytes": m.get("lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum", math.nan) * SECTOR,
                "l2_all_read_bytes": m.get("lts__t_sectors_op_read.sum", math.nan) * SECTOR,
                "l2_sector_hit_rate_pct": m.get("lts__t_sector_hit_rate.pct"),
                "ncu_duration_ms": m.get("gpu__time_duration.sum", math.nan) / 1e6,
                "median_ms": rep["median_ms"],
                "ctas_per_sm_limits": {k: v for k, v in m.items() if k.startswith("launch__occupancy_limit_")},
                "registers_per_thread": m.get("launch__registers_per_thread"),
                "kernel": rep["kernel"],
                "warps_per_cta": rep["warps_per_cta"],
                "ctas": rep["ctas"],
            }
            rec["measured"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in meas.items()}
        except (OSError, ValueError, KeyError) as e:
            rec["error"] = f"measurement: {e}"
        for kind in ("preset", "device", "half"):
            try:
                rec[f"predicted_{kind}"] = predicted(os.path.join(args.collect, f"sim_{kind}_{case}", "simulate.json"))
            except (OSError, ValueError, KeyError, StopIteration) as e:
                rec.setdefault("error", "")
                rec["error"] += f" simulate {kind}: {e}"
        if "measured" in rec and "predicted_device" in rec:
            me, pr = rec["measured"], rec["predicted_device"]
            ratio = {}
            for name, p, q in (("dram_read", pr["hbm_read_bytes"], me["dram_read_bytes"]),
                               ("l2_read", pr["l2_read_bytes"], me["l2_read_bytes"]),
                               ("time", pr["predicted_ms"], me["median_ms"])):
                ratio[name] = p / q if q else None
            rec["ratio_predicted_to_measured"] = ratio
            rec["within_15pct"] = {k: (v is not None and abs(v - 1) <= TOLERANCE) for k, v in ratio.items()
                                   if k != "time"}
        records.append(rec)
    out = {
        "what": "nsa simulate against Nsight Compute on today's selection kernel (slc_attn, the forward's "
                "version), same block_idx; Hq = 64, Hkv = 4, dk = dv = 128, l' = 64, n = 16, bf16, B = 1",
        "command": args.command,
        "date": datetime.date.today().isoformat(),
        "device": device,
        "tolerance": TOLERANCE,
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    table = make_table(out)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table)
    print(table)


def gb(x):
    return "n/a" if x is None else f"{x / 1e9:.3f}"


def make_table(res):
    lines = [f"Simulator vs Nsight Compute, {res.get('device')} ({res.get('date')}): selection kernel, "
             "bytes in GB; predicted = `nsa simulate` with the device's L2, SMs and measured CTAs per SM",
             "",
             "| selection | T | DRAM read meas. | pred. | ratio | L2 read meas. | pred. | ratio | L2 hit % meas. | pred. "
             "| kernel ms meas. | pred. (ceilings) | preset DRAM / L2 ratio | half-L2 DRAM ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["records"]:
        me, pr, pp = r.get("measured"), r.get("predicted_device"), r.get("predicted_preset")
        ph = r.get("predicted_half")
        if not me or not pr:
            lines.append(f"| {r['selection']} | {r['T']} | {r.get('error', 'missing')} ||||||||||||")
            continue
        ra = r["ratio_predicted_to_measured"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        preset = "n/a"
        if pp and me["dram_read_bytes"] and me["l2_read_bytes"]:
            preset = f"{pp['hbm_read_bytes'] / me['dram_read_bytes']:.3f} / {pp['l2_read_bytes'] / me['l2_read_bytes']:.3f}"
        lines.append(
            f"| {r['selection']} | {r['T']} | {gb(me['dram_read_bytes'])} | {gb(pr['hbm_read_bytes'])} | "
            f"{fmt(ra['dram_read'])} | {gb(me['l2_read_bytes'])} | {gb(pr['l2_read_bytes'])} | {fmt(ra['l2_read'])} | "
            f"{fmt(me['l2_sector_hit_rate_pct'])} | {100 * pr['sector_read_hit_rate']:.1f} | {fmt(me['median_ms'])} | "
            f"{pr['predicted_ms']:.3f} | {preset} | "
            f"{fmt(ph['hbm_read_bytes'] / me['dram_read_bytes']) if ph and me['dram_read_bytes'] else 'n/a'} |")
    ok = [v for r in res["records"] for v in r.get("within_15pct", {}).values()]
    lines += ["", f"{sum(ok)} of {len(ok)} byte predictions within {100 * res['tolerance']:.0f}% of the counters."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-args", nargs=2, metavar=("REPLAY_JSON", "NCU_CSV"))
    ap.add_argument("--l2-mb", metavar="REPLAY_JSON")
    ap.add_argument("--half", action="store_true")
    ap.add_argument("--collect", metavar="DIR")
    ap.add_argument("--cases")
    ap.add_argument("--command", default="scripts/validate_simulator.sh")
    ap.add_argument("--out")
    ap.add_argument("--table")
    ap.add_argument("--table-from")
    a = ap.parse_args()
    if a.device_args:
        print(device_args(*a.device_args))
    elif a.l2_mb:
        try:
            print(repr(json.load(open(a.l2_mb))["l2_bytes"] / 2**20 / (2 if a.half else 1)))
        except (OSError, ValueError, KeyError):
            pass
    elif a.collect:
        if not a.cases or not a.out:
            ap.error("--collect needs --cases and --out")
        collect(a)
    elif a.table_from:
        print(make_table(json.load(open(a.table_from))))
    else:
        ap.error("give --device-args, --collect or --table-from")


if __name__ == "__main__":
    sys.exit(main())
