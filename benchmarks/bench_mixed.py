"""Mixed-effects fits on pain21's whole brain: bids-group's estimators vs PyMARE's, one process.

For each estimator (WLS, DerSimonian-Laird, Hedges, ML, REML) on the voxels of pain21's mask
where all 21 variances are positive (PyMARE cannot exclude a map at a voxel; ~192,885 voxels):

* ours: :func:`bids_group.mixed_effects.fit_mixed` + a Knapp-Hartung t contrast (z included);
* PyMARE: the estimator's ``fit`` + ``summary().get_fe_stats()`` (its z included);

wall time, CPU time of this process (the machine may be shared), and peak traced memory
(``tracemalloc``, in a second run of each, so that tracing does not slow the timed one); then
parity (max |dz| and max relative tau^2 error where both optima agree) and the number of voxels
where PyMARE's likelihood optimum is lower than ours. Also ours on the whole mask (259,353
voxels, maps with zero variance excluded per voxel).

``--design software`` adds the SPM/FSL indicator of pain21's participants.tsv (studies 1-10 are
SPM) as a second column; z is then that column's.

Run: ``python benchmarks/bench_mixed.py [--data ../shared/data/real/pain21]
[--methods fe dl hedges ml reml] [--design intercept|software] [--no-memory] [--threads N]``.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "real" / "pain21"
METHODS = ["fe", "dl", "hedges", "ml", "reml"]


def load_pain21(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(effects, variances), each (21, n_mask_voxels) float32, in the order of the mask."""
    import nibabel as nib

    mask = np.asarray(nib.load(folder / "mask.nii.gz").dataobj) > 0

    def load(stem: str) -> np.ndarray:
        maps = [nib.load(folder / f"{stem}_{i:02d}.nii.gz").dataobj for i in range(1, 22)]
        return np.stack([np.asarray(m, dtype=np.float32)[mask] for m in maps])

    return load("contrast_pain"), load("var_pain")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--design", choices=["intercept", "software"], default="intercept")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    parser.add_argument("--threads", type=int, default=None, help="numba threads (ours)")
    args = parser.parse_args()

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
    print(f"numba threads: {numba.get_num_threads()}; design: {args.design}")
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


if __name__ == "__main__":
    main()
