"""Height thresholds: closed forms, nilearn's threshold_stats_img, and the error paths."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import scipy.stats as st

from bids_group.errors import DataError, UsageError
from bids_group.inference.height import HeightThreshold, height_threshold


@pytest.fixture(scope="module")
def z_img():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(12, 12, 12))
    z[2:6, 2:6, 2:6] += 4.0
    z[7:10, 7:10, 7:10] -= 4.5
    mask = np.zeros(z.shape, bool)
    mask[1:11, 1:11, 1:11] = True
    z[~mask] = 0.0
    return z, mask


@pytest.mark.parametrize("two_sided", [False, True])
def test_closed_forms(two_sided):
    z = np.random.default_rng(0).normal(size=1000)
    k = 2 if two_sided else 1
    fpr = height_threshold(z, method="fpr", alpha=0.001, two_sided=two_sided)
    assert fpr.z_threshold == pytest.approx(st.norm.isf(0.001 / k), rel=1e-14)
    assert fpr.p_threshold == 0.001 and fpr.n_tests == 1000
    bonf = height_threshold(z, method="bonferroni", alpha=0.05, two_sided=two_sided)
    assert bonf.z_threshold == pytest.approx(st.norm.isf(0.05 / 1000 / k), rel=1e-14)
    assert bonf.p_threshold == pytest.approx(5e-5)
    none = height_threshold(z, method="none", threshold=3.1, two_sided=two_sided)
    assert none.z_threshold == 3.1 and none.alpha is None
    assert none.p_threshold == pytest.approx(k * st.norm.sf(3.1), rel=1e-12)


@pytest.mark.parametrize("method", ["fpr", "fdr", "bonferroni"])
@pytest.mark.parametrize("two_sided", [False, True])
def test_matches_nilearn_threshold_stats_img(z_img, method, two_sided):
    from nilearn.glm import threshold_stats_img

    z, mask = z_img
    alpha = 0.05 if method != "fpr" else 0.001
    img = nib.Nifti1Image(z.astype(np.float32), np.eye(4))
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, thr = threshold_stats_img(
            img, mask_img, alpha=alpha, height_control=method, two_sided=two_sided
        )
    z_in = z.astype(np.float32)[mask]
    ours = height_threshold(z_in, method=method, alpha=alpha, two_sided=two_sided)
    assert ours.z_threshold == pytest.approx(thr, abs=1e-9)
    n_theirs = int(np.count_nonzero(out.get_fdata()))
    assert int(ours.survivors(z_in).sum()) == n_theirs


def test_fdr_records_p_threshold(z_img):
    z, mask = z_img
    res = height_threshold(z[mask], method="fdr", alpha=0.05, two_sided=True)
    assert isinstance(res, HeightThreshold)
    assert res.p_threshold == pytest.approx(2 * st.norm.sf(res.z_threshold), rel=1e-12)
    nothing = height_threshold(np.zeros(50), method="fdr", alpha=0.05, two_sided=False)
    assert nothing.z_threshold == np.inf and nothing.p_threshold is None
    assert not nothing.survivors(np.zeros(50)).any()


def test_default_alpha():
    z = np.zeros(10)
    assert height_threshold(z, method="fpr", two_sided=False).alpha == 0.001
    assert height_threshold(z, method="fdr", two_sided=False).alpha == 0.05


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"method": "fdr", "threshold": 3.0}, UsageError, "computes its own threshold"),
        ({"method": "fpr", "threshold": 3.0, "alpha": 0.01}, UsageError, "threshold"),
        ({"method": "none", "alpha": 0.01, "threshold": 3.0}, UsageError, "alpha"),
        ({"method": "none"}, UsageError, "explicit z threshold"),
        ({"method": "none", "threshold": -1.0}, UsageError, ">= 0"),
        ({"method": "fdr", "alpha": 1.5}, UsageError, r"\(0, 1\)"),
        ({"method": "holm", "alpha": 0.05}, UsageError, "Unknown height control"),
    ],
)
def test_contradictions_are_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        height_threshold(np.zeros(10), two_sided=True, **kwargs)


def test_bad_z():
    with pytest.raises(DataError, match="non-finite"):
        height_threshold(np.array([1.0, np.nan]), method="fpr", alpha=0.01, two_sided=False)
    with pytest.raises(DataError, match="no in-mask"):
        height_threshold(np.array([]), method="fpr", alpha=0.01, two_sided=False)
