"""Benchmark: permutation throughput of bids_group vs nilearn.non_parametric_inference.

One-sample t, 40 subjects, the MNI152 2 mm brain mask shipped with nilearn (~230,000 voxels),
smooth Gaussian noise with a weak blob. Both tools run in the same process on the same data;
the report is permutations per second and the ratio, plus the extrapolated time for 10,000.

Run (short by default; nilearn gets few permutations because it is slow)::

    python benchmarks/bench_permutation.py                     # ~2-4 min on 2 cores
    python benchmarks/bench_permutation.py --ours 10000 --tfce-ours 10000   # the absolute targets

Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import ndimage

from bids_group.inference.permutation import permutation_test
from bids_group.inference.tfce import TfceParams


def make_data(n_subjects: int, seed: int = 0):
    from nilearn.datasets import load_mni152_brain_mask

    mask_img = load_mni152_brain_mask(resolution=2)
    mask = mask_img.get_fdata() > 0
    rng = np.random.default_rng(seed)
    blob = np.zeros(mask.shape)
    blob[40:50, 50:60, 40:50] = 0.4
    data = np.empty((n_subjects, int(mask.sum())), dtype=np.float32)
    for i in range(n_subjects):
        vol = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.5)
        data[i] = (vol / vol[mask].std() + blob)[mask]
    return data, mask, mask_img


def time_ours(data, mask, n_perm, n_jobs, **kw):
    t0 = time.perf_counter()
    res = permutation_test(
        data,
        np.ones((data.shape[0], 1)),
        [1.0],
        n_perm=n_perm,
        mask=mask,
        seed=0,
        n_jobs=n_jobs,
        **kw,
    )
    return time.perf_counter() - t0, res


def time_nilearn(data, mask, mask_img, n_perm, n_jobs, **kw):
    import nibabel as nib
    import pandas as pd
    from nilearn.glm.second_level import non_parametric_inference

    imgs = []
    for row in data:
        vol = np.zeros(mask.shape, np.float32)
        vol[mask] = row
        imgs.append(nib.Nifti1Image(vol, mask_img.affine))
    dm = pd.DataFrame({"intercept": np.ones(data.shape[0])})
    # time only the permutation call; image assembly is excluded
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        non_parametric_inference(
            imgs,
            design_matrix=dm,
            mask=mask_img,
            n_perm=n_perm,
            random_state=0,
            n_jobs=n_jobs,
            **kw,
        )
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--ours", type=int, default=2000, help="our permutations, voxel/cluster")
    ap.add_argument("--tfce-ours", type=int, default=500, help="our permutations with TFCE")
    ap.add_argument("--nilearn", type=int, default=100, help="nilearn permutations, voxel")
    ap.add_argument("--nilearn-cluster", type=int, default=20)
    ap.add_argument("--nilearn-tfce", type=int, default=3)
    ap.add_argument("--skip-nilearn", action="store_true")
    ap.add_argument(
        "--two-sided", action="store_true", help="two-sided tests (|t|; both TFCE tails)"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings of the case names to run (e.g. 'TFCE (exact),fsl')",
    )
    args = ap.parse_args(argv)
    sided = {"two_sided": True} if args.two_sided else {}

    data, mask, mask_img = make_data(args.subjects)
    print(
        f"{args.subjects} subjects x {data.shape[1]} voxels, n_jobs={args.n_jobs}, "
        f"{'two' if args.two_sided else 'one'}-sided"
    )
    # compile the kernels once, outside the timings
    permutation_test(data[:, :64], np.ones((args.subjects, 1)), [1.0], n_perm=8, seed=0)
    time_ours(data, mask, 8, args.n_jobs, cluster_forming_p=0.001, tfce=True, **sided)

    rows = []
    cases = [
        ("voxel max-t", {}, args.ours, {}, args.nilearn),
        (
            "cluster size+mass",
            {"cluster_forming_p": 0.001},
            args.ours,
            {"threshold": 0.001},
            args.nilearn_cluster,
        ),
        ("TFCE (exact)", {"tfce": True}, args.tfce_ours, {"tfce": True}, args.nilearn_tfce),
        (
            "TFCE (fsl preset)",
            {"tfce": True, "tfce_params": TfceParams(integration="fsl")},
            args.tfce_ours,
            None,
            0,
        ),
        (
            "TFCE (nilearn preset)",
            {"tfce": True, "tfce_params": TfceParams(integration="nilearn")},
            args.tfce_ours,
            None,
            0,
        ),
    ]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    for name, kw, n_ours, nl_kw, n_nl in cases:
        if wanted and not any(w in name for w in wanted):
            continue
        t_ours, _ = time_ours(data, mask, n_ours, args.n_jobs, **kw, **sided)
        rate_ours = n_ours / t_ours
        line = (
            f"{name:24s} ours {n_ours:6d} perms {t_ours:8.2f} s = {rate_ours:9.1f}/s "
            f"(10,000 in {10_000 / rate_ours:7.1f} s)"
        )
        if nl_kw is not None and n_nl and not args.skip_nilearn:
            nl_kw = {**nl_kw, "two_sided_test": args.two_sided}
            t_nl = time_nilearn(data, mask, mask_img, n_nl, args.n_jobs, **nl_kw)
            rate_nl = n_nl / t_nl
            line += (
                f" | nilearn {n_nl} perms {t_nl:7.2f} s = {rate_nl:7.2f}/s "
                f"(10,000 in {10_000 / rate_nl / 60:7.1f} min) | ratio {rate_ours / rate_nl:7.1f}x"
            )
        print(line, flush=True)
        rows.append(line)


if __name__ == "__main__":
    main()
