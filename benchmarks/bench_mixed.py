"""Mixed effects on pain21's whole brain: bids-group vs NiMARE end to end, and vs PyMARE fit alone.

Two parts, in one run by default (``--part all``):

**end-to-end** (``--part end-to-end``). For each estimator (fe = fixed effects / weighted least
squares, dl = DerSimonian-Laird, hedges, ml, reml), each tool in a fresh child process started
by a small launcher process, which measures both the same way: wall time from start to exit
(interpreter start, imports, reading, fitting, writing), CPU time (user + system, all threads)
and peak RSS (``getrusage(RUSAGE_CHILDREN)``: the child's own ``ru_maxrss``). One untimed
bids-group run per estimator comes first (numba's kernel cache, the page cache):

* bids-group: the real CLI, ``bids-group DS OUT group --estimator <e> --adjustment <a> --mask
  pain21/mask.nii.gz --no-report -q``, on a BIDS derivatives layout of pain21 that this script
  builds in a temporary folder from symbolic links (``sub-NN/func/sub-NN_contrast-pain_stat-
  effect_statmap.nii.gz`` and its ``stat-variance`` sibling);
* floor: a child that only starts Python, imports the libraries of this path (numpy,
  scipy.special, scipy.ndimage, pandas, nibabel, pybids, numba) and reads + inflates the 42 maps
  (no index, fit or output): no program built on them can beat it, so NiMARE's time over it
  bounds any speed-up; measured again without numba, which the closed-form estimators (fe, dl,
  hedges) could do without;
* NiMARE 0.22.1: ``benchmarks/nimare_child.py`` in NiMARE's own interpreter (``nimare.meta.ibma``
  WeightedLeastSquares, DerSimonianLaird, Hedges, VarianceBasedLikelihood(method="ml"/"reml")
  on a ``nimare.dataset.Dataset`` of the same 42 images and mask: import, Dataset, fit, every
  result map written). It also reports its own step times and ``RUSAGE_SELF`` peak.

Then parity of the z maps in the voxels both tools estimate: max |dz|, max |dt| (t = effect /
standard error, the statistic before its reference distribution), the voxels NiMARE leaves NaN,
and for ML/REML the voxels where NiMARE's likelihood optimum is lower than bids-group's. The
adjustment is NiMARE's default by default (``--adjustment match``): Knapp-Hartung on n - p dof for
dl, hedges, ml, reml; for fe NiMARE refers est / se to a normal (Wald) and bids-group to t on
n - p dof (FLAME1), so z differs in the tails while t agrees.

NiMARE 0.22.1 needs nilearn 0.13 and bids-group pins 0.14, so NiMARE lives in its own venv; make
it once with ``python3 -m venv /work/nimare-venv && /work/nimare-venv/bin/pip install
nimare==0.22.1`` (or pass ``--make-nimare-venv``), or point ``--nimare-python`` at another.

**fit** (``--part fit``). For each estimator on the voxels of pain21's mask where all 21
variances are positive (PyMARE cannot exclude a map at a voxel; ~192,885 voxels):

* ours: :func:`bids_group.mixed_effects.fit_mixed` + a Knapp-Hartung t contrast (z included);
* PyMARE: the estimator's ``fit`` + ``summary().get_fe_stats()`` (its z included);

wall time, CPU time of this process (the machine may be shared), and peak traced memory
(``tracemalloc``, in a second run of each, so that tracing does not slow the timed one); then
parity (max |dz| and max relative tau^2 error where both optima agree) and the number of voxels
where PyMARE's likelihood optimum is lower than ours. Also ours on the whole mask (259,353
voxels, maps with zero variance excluded per voxel).

``--design software`` (fit part only) adds the SPM/FSL indicator of pain21's participants.tsv
(studies 1-10 are SPM) as a second column; z is then that column's.

Run: ``python benchmarks/bench_mixed.py [--part fit|end-to-end|all]
[--data ../shared/data/real/pain21] [--methods fe dl hedges ml reml] [--design intercept|software]
[--no-memory] [--threads N] [--nimare-python /work/nimare-venv/bin/python] [--n-jobs 1]
[--adjustment match|none|knapp-hartung]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "real" / "pain21"
DEFAULT_NIMARE_PYTHON = Path("/work/nimare-venv/bin/python")
METHODS = ["fe", "dl", "hedges", "ml", "reml"]
N_STUDIES = 21
#: NiMARE's default small-sample correction per estimator (PyMARE 0.0.13's defaults: the
#: adjustment where tau^2 is estimated, none for WLS), as bids-group's --adjustment.
NIMARE_ADJUSTMENT = {"fe": "none", "dl": "knapp-hartung", "hedges": "knapp-hartung"}
NIMARE_ADJUSTMENT |= {"ml": "knapp-hartung", "reml": "knapp-hartung"}


def load_pain21(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(effects, variances), each (21, n_mask_voxels) float32, in the order of the mask."""
    import nibabel as nib

    mask = np.asarray(nib.load(folder / "mask.nii.gz").dataobj) > 0

    def load(stem: str) -> np.ndarray:
        maps = [nib.load(folder / f"{stem}_{i:02d}.nii.gz").dataobj for i in range(1, 22)]
        return np.stack([np.asarray(m, dtype=np.float32)[mask] for m in maps])

    return load("contrast_pain"), load("var_pain")


# ---------------------------------------------------------------- fit alone, vs PyMARE


def ours(method: str, y: np.ndarray, v: np.ndarray, x: np.ndarray):
    """Fit and a Knapp-Hartung t contrast on the last column: (tau2, z, fit)."""
    from bids_group.mixed_effects import fit_mixed, mixed_contrast

    fit = fit_mixed(y, v, x, method)
    adjustment = "none" if method == "fe" else "knapp-hartung"
    weights = np.eye(x.shape[1])[-1]
    return fit.tau2, mixed_contrast(fit, weights, adjustment=adjustment).z, fit


def pymare(method: str, y: np.ndarray, v: np.ndarray, x: np.ndarray):
    """PyMARE's estimator and its fe stats (last column): (tau2, z); Knapp-Hartung except for
    WLS (Wald)."""
    from pymare import estimators as est

    if method == "fe":
        model = est.WeightedLeastSquares().fit(y=y, X=x, v=v)
    else:
        model = {
            "dl": est.DerSimonianLaird,
            "hedges": est.Hedges,
            "ml": lambda: est.VarianceBasedLikelihoodEstimator("ML"),
            "reml": lambda: est.VarianceBasedLikelihoodEstimator("REML"),
        }[method]()
        model.fit(y=y, v=v, X=x)
    z = model.summary().get_fe_stats()["z"][-1]
    return np.ravel(model.params_["tau2"]) * np.ones(y.shape[1]), z


def measure(func, *args, memory: bool):
    """(result, wall s, cpu s, peak traced MiB or nan)."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = func(*args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = np.nan
    if memory:
        tracemalloc.start()
        func(*args)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result, wall, cpu, peak


def parity(method: str, y, v, x, ours_out, theirs_out) -> str:
    """max |dz| and max relative tau^2 error where PyMARE is not on a lower optimum."""
    from bids_group.distributions import t_to_z
    from bids_group.mixed_effects import log_likelihood

    tau2, z, fit = ours_out
    tau2_p, z_p = theirs_out
    if method == "fe":
        z_p = t_to_z(z_p, y.shape[0] - x.shape[1])  # PyMARE's Wald z is normal-referenced
    same = np.ones(y.shape[1], dtype=bool)
    note = ""
    if method in ("ml", "reml"):
        reml = method == "reml"
        gain = log_likelihood(y, v, x, tau2, reml) - log_likelihood(y, v, x, tau2_p, reml)
        same = gain < 1e-6
        worse = ~same
        note = (
            f"; PyMARE on a lower optimum at {worse.sum()} voxels "
            f"(|dz| up to {np.abs(z - z_p)[worse].max() if worse.any() else 0:.3g}, "
            f"loglik up to {gain.max():.3g} lower); ours never lower (min gain {gain.min():.2g})"
        )
    clear = same & (tau2_p > 1e-3 * np.median(v))
    rel = np.abs(tau2 - tau2_p)[clear] / tau2_p[clear]
    return (
        f"max|dz| {np.abs(z - z_p)[same].max():.2e}, max rel tau2 "
        f"{rel.max() if rel.size else 0:.2e} (tau2 > 1e-3 median v), "
        f"exact zeros ours {np.sum(tau2 == 0)} / PyMARE {np.sum(tau2_p == 0)}{note}"
    )


# ---------------------------------------------------------------- end to end, vs NiMARE


def build_layout(data: Path, root: Path) -> Path:
    """pain21 as a BIDS derivatives dataset of symbolic links, for the bids-group CLI.

    ``sub-NN/func/sub-NN_contrast-pain_stat-effect_statmap.nii.gz`` links to
    ``contrast_pain_NN.nii.gz`` and its ``stat-variance`` sibling to ``var_pain_NN.nii.gz``
    (NN = 01..21); nothing is copied or written into ``data``. Returns ``root``.
    """
    root.mkdir(parents=True)
    description = {"Name": "pain21 (links)", "BIDSVersion": "1.9.0"}
    description |= {"DatasetType": "derivative", "GeneratedBy": [{"Name": "bench_mixed.py"}]}
    (root / "dataset_description.json").write_text(json.dumps(description))
    subjects = [f"sub-{i:02d}" for i in range(1, N_STUDIES + 1)]
    for i, subject in enumerate(subjects, start=1):
        folder = root / subject / "func"
        folder.mkdir(parents=True)
        for stat, stem in (("effect", "contrast_pain"), ("variance", "var_pain")):
            link = folder / f"{subject}_contrast-pain_stat-{stat}_statmap.nii.gz"
            link.symlink_to(data.resolve() / f"{stem}_{i:02d}.nii.gz")
    (root / "participants.tsv").write_text("\n".join(["participant_id", *subjects]) + "\n")
    return root


#: Run by a fresh small interpreter: start ``argv[2:]``, wait, and write its wall time, CPU time
#: and peak RSS to ``argv[1]``. Linux keeps a process's peak RSS across exec, so a child spawned
#: straight from this benchmark (hundreds of MB after the fit part) would report at least this
#: benchmark's size; spawned from the launcher it starts from the launcher's ~10 MB.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[2:]).returncode
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = usage.ru_utime + usage.ru_stime
with open(sys.argv[1], "w") as sink:
    json.dump({"code": code, "wall": wall, "cpu": cpu, "maxrss_kib": usage.ru_maxrss}, sink)
"""


def run_measured(command: list[str], log: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one child process, its output in ``log``; stops on failure.

    A small launcher process starts the child and reads its CPU time (user + system, all
    threads) and peak RSS with ``getrusage(RUSAGE_CHILDREN)``: the child's own, measured the same
    way for both tools. On a shared machine CPU time moves much less with the load than wall
    time.
    """
    usage_file = log.with_suffix(".usage.json")
    with log.open("w") as sink:
        launcher = [sys.executable, "-I", "-c", LAUNCHER, str(usage_file), *command]
        subprocess.run(launcher, stdout=sink, stderr=subprocess.STDOUT, check=False)
    usage = json.loads(usage_file.read_text()) if usage_file.exists() else {"code": "?"}
    if usage["code"] != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{command[0]} failed (exit {usage['code']}):\n{tail}")
    return usage["wall"], usage["cpu"], usage["maxrss_kib"] * 1024 / 1e6


#: The floor of any Python program doing this job with bids-group's libraries: start the
#: interpreter, import what the mixed-effects path needs (numpy, scipy.special, scipy.ndimage,
#: pandas, nibabel, pybids' layout, numba) and read + inflate the 42 maps (ISA-L when installed,
#: as bids-group; threads = argv[2]); no indexing, no fit, no output.
FLOOR = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy, scipy.special, scipy.ndimage, pandas, nibabel, bids.layout, numba
try:
    from isal.igzip import decompress
except ImportError:
    from gzip import decompress
paths = sorted(Path(sys.argv[1]).glob("*_pain_*.nii.gz"))
def read(path):
    image = nibabel.Nifti1Image.from_bytes(decompress(path.read_bytes()))
    return numpy.asarray(image.dataobj, dtype=numpy.float32)
with ThreadPoolExecutor(int(sys.argv[2])) as pool:
    assert len(list(pool.map(read, paths))) == 42
"""
#: The same without numba: the closed-form estimators (fe, dl, hedges) could be written without
#: it, so their bound is NiMARE's time over this one.
FLOOR_WITHOUT_NUMBA = FLOOR.replace(", bids.layout, numba\n", ", bids.layout\n")


def ensure_nimare(python: Path, make: bool) -> None:
    """Stop with the one-line recipe unless NiMARE's interpreter exists (or make it)."""
    if python.exists():
        return
    venv = python.parent.parent
    recipe = f"python3 -m venv {venv} && {venv}/bin/pip install nimare==0.22.1"
    if not make:
        raise SystemExit(f"no NiMARE interpreter at {python}; make it with: {recipe}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "nimare==0.22.1"], check=True)


def bids_group_command(ds: Path, out: Path, data: Path, method: str, adjustment: str, jobs: int):
    """The real console script of this interpreter's environment (module form as fallback)."""
    script = Path(sys.executable).parent / "bids-group"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "bids_group"]
    options = ["--estimator", method, "--adjustment", adjustment, "--n-jobs", str(jobs)]
    options += ["--mask", str(data / "mask.nii.gz"), "--no-report", "-q"]
    return [*head, str(ds), str(out), "group", *options]


def _in_mask(path: Path, inside: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.float64)[inside]


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} under {folder}, found {len(found)}")
    return found[0]


def end_to_end_parity(method: str, data: Path, ours: Path, theirs: Path) -> str:
    """z and t parity between bids-group's maps (``ours``) and NiMARE's (``theirs``).

    In the voxels both estimate (finite z in both, inside pain21's mask): max |dz| and max |dt|
    (t = estimate / standard error). For ML/REML, the voxels where NiMARE's (restricted)
    likelihood, evaluated on the values NiMARE keeps, is more than 1e-6 below bids-group's are
    counted and left out of the maxima (another local optimum), as are the voxels where the
    two tools keep different values (an effect of exactly 0 with a positive variance, which
    NiMARE drops and bids-group keeps).
    """
    import nibabel as nib

    inside = np.asarray(nib.load(data / "mask.nii.gz").dataobj) > 0
    z, z_n = (
        _in_mask(_only(ours, "*stat-z_statmap.nii.gz"), inside),
        _in_mask(theirs / "z.nii.gz", inside),
    )
    t = _in_mask(_only(ours, "*stat-t_statmap.nii.gz"), inside)
    t_n = _in_mask(theirs / "est.nii.gz", inside) / _in_mask(theirs / "se.nii.gz", inside)
    y_all, v_all = load_pain21(data)
    y, v = y_all.astype(np.float64), v_all.astype(np.float64)
    tiny = 1.0 / np.sqrt(np.finfo(np.float32).max)  # NiMARE's floor on a float32 variance
    kept_nimare = np.isfinite(y) & (y != 0) & np.isfinite(v) & (v > tiny)
    kept_ours = np.isfinite(y) & np.isfinite(v) & (v > 0)
    same_data = (kept_nimare == kept_ours).all(axis=0)
    both = np.isfinite(z) & np.isfinite(z_n) & (z != 0)
    notes = [
        f"{both.sum()} voxels both; NiMARE NaN at {np.isnan(z_n).sum()} of {inside.sum()} "
        f"mask voxels, bids-group leaves out {(~np.isfinite(z) | (z == 0)).sum()}; "
        f"{(both & ~same_data).sum()} voxels where the tools keep different values left out"
    ]
    compare = both & same_data
    if method in ("ml", "reml"):
        from bids_group.mixed_effects import log_likelihood

        v_n = np.where(kept_nimare, v, np.nan)
        x = np.ones((y.shape[0], 1))
        tau2 = _in_mask(_only(ours, "*stat-tau2_statmap.nii.gz"), inside)
        tau2_n = np.nan_to_num(_in_mask(theirs / "tau2.nii.gz", inside))
        reml = method == "reml"
        gain = log_likelihood(y, v_n, x, tau2, reml) - log_likelihood(y, v_n, x, tau2_n, reml)
        lower = compare & (gain > 1e-6)
        dz_lower = np.abs(z - z_n)[lower].max() if lower.any() else 0.0
        notes.append(
            f"NiMARE on a lower optimum at {lower.sum()} voxels (|dz| up to {dz_lower:.3g}, "
            f"loglik up to {gain[compare].max():.3g} lower); bids-group's never lower by more "
            f"than {max(-gain[compare].min(), 0):.2g}"
        )
        compare &= ~lower
    dz, dt = np.abs(z - z_n)[compare], np.abs(t - t_n)[compare]
    worst = np.argmax(np.abs(z - z_n) * compare)
    head = (
        f"max|dz| {dz.max():.2e} (at z {z[worst]:.2f} vs NiMARE {z_n[worst]:.2f}), "
        f"max|dt| {dt.max():.2e}"
    )
    if method == "fe":  # NiMARE's WLS z is est / se itself (Wald); ours is t on n - p dof
        dof = _in_mask(_only(ours, "*stat-dof_statmap.nii.gz"), inside)
        referred = _referred(t_n, dof, compare)
        head += f", max|dz| {np.abs(z - referred)[compare].max():.2e} with NiMARE's est / se on t"
    return "; ".join([head, *notes])


def _referred(t: np.ndarray, dof: np.ndarray, where: np.ndarray) -> np.ndarray:
    """z of ``t`` on Student's t with each voxel's ``dof`` (NaN outside ``where``)."""
    from bids_group.distributions import t_to_z

    z = np.full(t.shape, np.nan)
    for value in np.unique(dof[where]):
        at = where & (dof == value)
        z[at] = t_to_z(t[at], float(value))
    return z


def nimare_report(log: Path) -> dict:
    """The JSON line ``nimare_child.py`` prints last."""
    return json.loads(log.read_text().strip().splitlines()[-1])


def run_end_to_end(args: argparse.Namespace) -> None:
    """Each estimator: bids-group's CLI and NiMARE, each in a child process, then parity."""
    ensure_nimare(args.nimare_python, args.make_nimare_venv)
    data = args.data.resolve()
    print(
        f"end to end: bids-group CLI (--n-jobs {args.n_jobs}) vs NiMARE 0.22.1 "
        f"({args.nimare_python}); load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_layout(data, Path(tmp) / "ds")
        floor_command = [sys.executable, "-c", FLOOR, str(data), str(args.n_jobs)]
        run_measured(floor_command, Path(tmp) / "floor.log")  # the page cache
        floor = run_measured(floor_command, Path(tmp) / "floor.log")
        print(
            f"floor (interpreter + imports + reading the 42 maps, {args.n_jobs} thread(s), no "
            f"fit, no output): {floor[0]:.2f} s (cpu {floor[1]:.2f}), {floor[2]:.0f} MB",
            flush=True,
        )
        floor_command[2] = FLOOR_WITHOUT_NUMBA
        light = run_measured(floor_command, Path(tmp) / "floor.log")
        print(f"floor without numba: {light[0]:.2f} s (cpu {light[1]:.2f})", flush=True)
        for method in args.methods:
            adjustment = (
                NIMARE_ADJUSTMENT[method] if args.adjustment == "match" else args.adjustment
            )
            ours, theirs = Path(tmp) / f"ours-{method}", Path(tmp) / f"nimare-{method}"
            command = bids_group_command(ds, ours, data, method, adjustment, args.n_jobs)
            run_measured(command, Path(tmp) / "warm.log")  # numba's cache, the page cache
            shutil.rmtree(ours)
            w1, c1, m1 = run_measured(command, Path(tmp) / f"ours-{method}.log")
            child = [str(args.nimare_python), str(HERE / "nimare_child.py"), str(data), method]
            log = Path(tmp) / f"nimare-{method}.log"
            w2, c2, m2 = run_measured([*child, str(theirs)], log)
            steps = nimare_report(log)
            print(
                f"{method:7s} bids-group {w1:6.2f} s (cpu {c1:6.2f}), {m1:5.0f} MB | NiMARE "
                f"{w2:6.2f} s (cpu {c2:6.2f}; import {steps['import_s']:.1f}, Dataset "
                f"{steps['dataset_s']:.1f}, fit {steps['fit_s']:.1f}, save {steps['save_s']:.1f}), "
                f"{m2:5.0f} MB | {w2 / w1:5.1f}x faster (cpu {c2 / c1:5.1f}x), memory ratio "
                f"{m1 / m2:.2f}; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            print(
                f"        parity (bids-group --adjustment {adjustment}): "
                f"{end_to_end_parity(method, data, ours, theirs)}; NiMARE set "
                f"{steps['invalid_variances']} variance values (maps x voxels) to NaN",
                flush=True,
            )
            rows.append((method, w1, c1, m1, w2, c2, m2))
    print(
        "\n| estimator | bids-group: wall (CPU), peak RSS | NiMARE: wall (CPU), peak RSS | ", end=""
    )
    print("speed-up wall (CPU) | memory ratio | NiMARE / floor (w/o numba) |")
    print("|---|---|---|---|---|---|")
    for method, w1, c1, m1, w2, c2, m2 in rows:
        print(
            f"| {method} | {w1:.1f} s ({c1:.1f} s), {m1:.0f} MB | {w2:.1f} s ({c2:.1f} s), "
            f"{m2:.0f} MB | {w2 / w1:.1f}x ({c2 / c1:.1f}x) | {m1 / m2:.2f} | "
            f"{w2 / floor[0]:.1f}x ({w2 / light[0]:.1f}x) |"
        )
    print(
        f"floor: {floor[0]:.2f} s wall ({floor[1]:.2f} s CPU), {light[0]:.2f} s without numba: "
        "the most any tool built on these libraries can be faster than NiMARE is its time "
        "divided by this"
    )


# ---------------------------------------------------------------- command line


def run_fit(args: argparse.Namespace) -> None:
    """Each estimator: our fit vs PyMARE's on arrays, in this process, then parity."""
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    y_all, v_all = load_pain21(args.data)
    positive = (v_all > 0).all(axis=0)
    y = y_all[:, positive].astype(np.float64)
    v = v_all[:, positive].astype(np.float64)
    x = np.ones((21, 1))
    if args.design == "software":
        x = np.column_stack([x, np.r_[np.ones(10), np.zeros(11)]])
    print(f"pain21: {y_all.shape[1]} mask voxels, {y.shape[1]} with all variances positive")
    print(f"fit alone: numba threads: {numba.get_num_threads()}; design: {args.design}")
    ours(args.methods[0], y[:, :10], v[:, :10], x)  # compile (or load the cache) first
    memory = not args.no_memory
    for method in args.methods:
        mine, w1, c1, m1 = measure(ours, method, y, v, x, memory=memory)
        theirs, w2, c2, m2 = measure(pymare, method, y, v, x, memory=memory)
        _, w3, c3, m3 = measure(ours, method, y_all, v_all, x, memory=memory)
        print(
            f"{method:7s} ours {w1:6.2f} s (cpu {c1:6.2f}, {m1:7.1f} MiB) | PyMARE {w2:6.2f} s "
            f"(cpu {c2:6.2f}, {m2:7.1f} MiB) | wall ratio {w2 / w1:5.1f}x, cpu ratio "
            f"{c2 / c1:5.1f}x, memory ratio {m2 / m1:4.1f}x | whole mask ours {w3:5.2f} s "
            f"({m3:.1f} MiB)"
        )
        print(f"        parity: {parity(method, y, v, x, mine, theirs)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["fit", "end-to-end", "all"], default="all")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--design", choices=["intercept", "software"], default="intercept")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    parser.add_argument("--threads", type=int, default=None, help="numba threads (fit part)")
    parser.add_argument("--nimare-python", type=Path, default=DEFAULT_NIMARE_PYTHON)
    parser.add_argument("--make-nimare-venv", action="store_true", help="create it if absent")
    parser.add_argument("--n-jobs", type=int, default=1, help="bids-group --n-jobs (end to end)")
    parser.add_argument(
        "--adjustment",
        choices=["match", "none", "knapp-hartung"],
        default="match",
        help="bids-group --adjustment end to end; match = NiMARE's default per estimator",
    )
    args = parser.parse_args()
    if args.part in ("fit", "all"):
        run_fit(args)
    if args.part in ("end-to-end", "all"):
        run_end_to_end(args)


if __name__ == "__main__":
    main()
