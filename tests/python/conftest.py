# Shared by the Python tests: the `nsa` executable the binding is checked against (NSA_BIN, else the
# build folders of the presets), small workloads, and a runner that writes inputs as .npy files.
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small NSA settings that exercise every branch at T ~ 100: several compressed blocks, more
# selection blocks than n, a window shorter than T.
SMALL = dict(cmp_len=8, cmp_stride=4, slc_len=16, slc_count=4, window=32)


def _find_nsa():
    env = os.environ.get("NSA_BIN")
    if env:
        return env
    for d in ("build", "build-cpu", "build-debug"):
        p = ROOT / d / "experiments" / "nsa"
        if p.exists():
            return str(p)
    return shutil.which("nsa")


@pytest.fixture(scope="session")
def nsa_bin():
    p = _find_nsa()
    if not p:
        pytest.skip("no `nsa` executable (set NSA_BIN or build with a preset): the comparisons with the CLI's files need it")
    return p


def cli_options(settings):
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


class Cli:
    """Runs `nsa <cmd>` on arrays saved as .npy files in a temporary folder; returns the output folder's arrays."""

    def __init__(self, exe, tmp):
        self.exe, self.tmp, self.n = exe, Path(tmp), 0

    def save(self, name, a):
        p = self.tmp / f"{name}_{self.n}.npy"
        np.save(p, a)
        return str(p)

    def run(self, cmd, files, options=(), positional=(), check=True):
        self.n += 1
        out = self.tmp / f"out_{self.n}"
        args = [self.exe, cmd, *positional]
        for opt, a in files.items():
            args += [f"--{opt.replace('_', '-')}", self.save(opt, a)]
        args += list(options)
        if cmd != "compare":
            args += ["--out", str(out)]
        p = subprocess.run(args, capture_output=True, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        self.last = p
        if cmd == "compare" or not check:
            return p
        return {f.stem: np.load(f) for f in sorted(out.glob("*.npy"))}


@pytest.fixture
def cli(nsa_bin, tmp_path):
    return Cli(nsa_bin, tmp_path)


def workload(T=100, Hq=4, Hkv=2, dk=16, dv=8, dtype=np.float64, seed=0, batch=0, gates=True):
    """q, k, v ~ N(0, 1) and gates ~ U(0, 1) ([T, ...], or [batch, T, ...])."""
    rng = np.random.default_rng(seed)
    lead = (batch, T) if batch else (T,)
    w = dict(q=rng.standard_normal(lead + (Hq, dk)), k=rng.standard_normal(lead + (Hkv, dk)),
             v=rng.standard_normal(lead + (Hkv, dv)))
    if gates:
        w["gates"] = rng.uniform(size=lead + (Hq, 3))
    return {n: a.astype(dtype) for n, a in w.items()}


def assert_same(files, result, names=None):
    """Every file equals the result's array of the same name, bit for bit (NaN and -inf included)."""
    names = names if names is not None else sorted(files)
    assert names, "no files to compare"
    for n in names:
        a, b = np.asarray(result[n]), files[n]
        assert a.dtype == b.dtype, f"{n}: dtype {a.dtype} vs the file's {b.dtype}"
        assert a.shape == b.shape, f"{n}: shape {a.shape} vs the file's {b.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{n}: differs from the file"
