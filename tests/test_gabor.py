"""Gabor fits of first-layer filters and the comparison with Ringach's (2002) V1 simple cells."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from cnnlab.errors import ModelError
from cnnlab.models import create_model
from cnnlab.viz.gabor import (
    DEFAULT_TOLERANCE,
    V1_SIMPLE_CELLS,
    GaborFit,
    _model_and_jacobian,
    analyze_filters,
    compare_with_v1,
    filter_to_2d,
    first_conv_weight,
    fit_gabor,
    fit_gabors,
    format_gabor_summary,
    format_permutation_p,
    gabor_image,
    plot_gabor_fits,
    plot_v1_comparison,
    profile_intervals,
)


def gabor(size, x0, y0, theta_deg, f, phase_deg, sx, sy):
    """Ringach's Gabor written out independently of the module: x' across the bars, y' along them."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    t = math.radians(theta_deg)
    xp = (x - x0) * math.cos(t) + (y - y0) * math.sin(t)
    yp = -(x - x0) * math.sin(t) + (y - y0) * math.cos(t)
    return np.exp(-(xp**2) / (2 * sx**2) - yp**2 / (2 * sy**2)) * np.cos(2 * math.pi * f * xp + math.radians(phase_deg))


def angle_error(a_deg, b_deg):
    """Orientation difference mod 180 degrees."""
    return abs((a_deg - b_deg + 90) % 180 - 90)


# (f, sigma_x, sigma_y) per size: envelopes that fit in the patch and at least ~0.3 carrier periods per sigma
# (nx >= 0.3); below that a Gabor is a blob or an edge and f trades off against sigma_x, whatever the fitter.
SHAPES = {
    7: [(0.22, 1.5, 2.0), (0.30, 1.2, 1.6), (0.25, 1.8, 1.2), (0.30, 1.0, 1.3)],
    11: [(0.12, 2.8, 3.5), (0.20, 2.0, 2.6), (0.30, 1.5, 2.8), (0.16, 3.0, 2.0)],
}


def known_gabors(size, noise, seed=0):
    rng = np.random.default_rng(seed)
    truth, planes = [], []
    c = (size - 1) / 2
    for theta, (f, sx, sy), phase in itertools.product((0, 30, 75, 120, 165), SHAPES[size], (0, 90, -135)):
        truth.append((theta, f, sx, sy))
        planes.append(
            gabor(size, c + 0.3, c - 0.4, theta, f, phase, sx, sy) + noise * rng.standard_normal((size, size))
        )
    return np.stack(planes), truth


@pytest.mark.parametrize("size", [7, 11])
def test_fits_recover_orientation_frequency_and_shape(size):
    # noise sd 2% of the peak: at that level the fit's own statistical error in nx is ~5% at 7x7 (measured
    # over seeds), so the tolerances check the optimiser, not the noise
    planes, truth = known_gabors(size, noise=0.02)
    fits = fit_gabors(planes)
    for fit, (theta, f, sx, sy) in zip(fits, truth):
        assert angle_error(fit.theta_deg, theta) < 5, (fit, theta)
        assert fit.frequency == pytest.approx(f, rel=0.05)
        assert fit.nx == pytest.approx(sx * f, rel=0.10)
        assert fit.ny == pytest.approx(sy * f, rel=0.10)
        assert fit.r2 > 0.95


def test_sigma_x_runs_across_the_bars():
    # vertical bars (carrier along x): theta = 0, the narrow envelope across them is sigma_x
    plane = gabor(11, 5, 5, 0, 0.2, 0, sx=1.6, sy=3.2)
    fit = fit_gabor(torch.tensor(plane))
    assert angle_error(fit.theta_deg, 0) < 1
    assert fit.sigma_x == pytest.approx(1.6, rel=0.02)
    assert fit.sigma_y == pytest.approx(3.2, rel=0.02)
    assert abs(fit.phase_deg) < 2 and fit.amplitude == pytest.approx(1, rel=0.02)
    assert np.abs(gabor_image(fit, plane.shape) - plane).max() < 0.01


def test_the_analytic_jacobian_matches_central_differences():
    rng = np.random.default_rng(5)
    xs, ys = (v.ravel().astype(np.float64) for v in np.meshgrid(np.arange(9), np.arange(7)))
    # x0, y0, theta, f, sigma_x, sigma_y, a, b, offset
    p = np.column_stack(
        [
            rng.uniform(2, 6, 6),
            rng.uniform(2, 5, 6),
            rng.uniform(-3, 3, 6),
            rng.uniform(0.05, 0.4, 6),
            rng.uniform(0.8, 4, 6),
            rng.uniform(0.8, 4, 6),
            rng.normal(size=6),
            rng.normal(size=6),
            rng.normal(size=6),
        ]
    )
    _, jac = _model_and_jacobian(p, xs, ys)
    assert jac.shape == (6, 9, 63)
    for i in range(9):
        h = 1e-6 * max(1.0, abs(p[:, i]).max())
        up, down = p.copy(), p.copy()
        up[:, i] += h
        down[:, i] -= h
        numeric = (_model_and_jacobian(up, xs, ys)[0] - _model_and_jacobian(down, xs, ys)[0]) / (2 * h)
        assert np.abs(jac[:, i] - numeric).max() < 1e-6 * max(1.0, np.abs(numeric).max()), f"parameter {i}"


V1_NX = (0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2, 1.6)  # across the range of Ringach's cells


def random_gabors(size, nx, trials, noise, rng):
    """Gabors with the given nx at random orientation, phase, centre, sigma (1 to size/4 pixels) and ny."""
    planes, truth = [], []
    c = (size - 1) / 2
    for _ in range(trials):
        sx = rng.uniform(1.0, size / 4)
        f = nx / sx
        if f > 0.45:  # keep the carrier below Nyquist, widening the envelope instead
            sx, f = nx / 0.45, 0.45
        sy = rng.uniform(1.0, size / 4)
        planes.append(
            gabor(
                size,
                c + rng.uniform(-0.5, 0.5),
                c + rng.uniform(-0.5, 0.5),
                rng.uniform(0, 180),
                f,
                rng.uniform(-180, 180),
                sx,
                sy,
            )
            + noise * rng.standard_normal((size, size))
        )
        truth.append((sx * f, sy * f))
    return np.stack(planes), np.array(truth)


def check_recovery_or_flag(size, trials, seed):
    """Fits whose nx or ny misses the truth by more than the tolerance are flagged (not pinned down), but for the
    1 in 20 whose 95% interval misses the truth as well; the flagged fits' intervals mostly contain the truth; and
    well inside V1's range the flag is rare. Over 30 trials per nx at 2% noise and a 10% tolerance, 2 of 89 misses
    went unflagged at 7x7 and 0 of 59 at 11x11 (the slow test prints its tally)."""
    rng = np.random.default_rng(seed)
    tolerances = (0.10, DEFAULT_TOLERANCE)
    tally = {
        "missed": np.zeros(2),
        "missed_unflagged": np.zeros(2),
        "flagged": 0,
        "flagged_covering": 0,
        "mid_range": 0,
        "mid_range_pinned": 0,
    }
    for nx in V1_NX:
        planes, truth = random_gabors(size, nx, trials, noise=0.02, rng=rng)
        fits = fit_gabors(planes)
        bounds = profile_intervals(planes, fits)
        for j, name in enumerate(("nx", "ny")):
            estimate = np.array([getattr(f, name) for f in fits])
            low, high, is_open = bounds[f"{name}_low"], bounds[f"{name}_high"], bounds[f"{name}_open"]
            assert np.all((low <= estimate * (1 + 1e-9)) & (estimate <= high * (1 + 1e-9)))
            error = np.abs(estimate / truth[:, j] - 1)
            for k, tol in enumerate(tolerances):
                pinned = ~is_open & (low >= estimate / (1 + tol)) & (high <= estimate * (1 + tol))
                tally["missed"][k] += (error > tol).sum()
                tally["missed_unflagged"][k] += ((error > tol) & pinned).sum()
            pinned = ~is_open & (low >= estimate / 1.1) & (high <= estimate * 1.1)
            covering = (low <= truth[:, j]) & (truth[:, j] <= high)
            tally["flagged"] += (~pinned).sum()
            tally["flagged_covering"] += (~pinned & covering).sum()
            if name == "nx" and 0.3 <= nx <= 1.2:
                tally["mid_range"] += trials
                tally["mid_range_pinned"] += pinned.sum()
    # printed for the docs' figure (docs/v1.md): pytest tests/test_gabor.py -m slow -k 30_trials -s
    print(
        f"\n{size}x{size}, {trials} trials per nx: of the nx/ny estimates that missed the truth by > 10%, "
        f"{tally['missed_unflagged'][0]:.0f} of {tally['missed'][0]:.0f} went unflagged at a 10% tolerance; "
        f"at {DEFAULT_TOLERANCE:.0%}: {tally['missed_unflagged'][1]:.0f} of {tally['missed'][1]:.0f}"
    )
    assert np.all(tally["missed"] > 0)  # the low-nx end does produce misses to flag
    assert np.all(tally["missed_unflagged"] <= np.maximum(1, 0.05 * tally["missed"])), tally
    assert tally["flagged_covering"] >= 0.8 * tally["flagged"], tally
    assert tally["mid_range_pinned"] >= 0.8 * tally["mid_range"], tally


@pytest.mark.parametrize("size", [7, 11])
def test_nx_is_recovered_or_flagged_across_v1s_range(size):
    check_recovery_or_flag(size, trials=5, seed=size)


@pytest.mark.slow
@pytest.mark.parametrize("size", [7, 11])
def test_nx_is_recovered_or_flagged_across_v1s_range_30_trials(size):
    check_recovery_or_flag(size, trials=30, seed=100 + size)


def test_a_blob_has_an_open_nx_interval():
    # a tenth of a carrier period per sigma: f trades off against sigma_x, nothing in the data fixes nx
    plane = gabor(11, 5, 5, 30, 0.05, 90, 2.0, 2.5) + 0.02 * np.random.default_rng(6).standard_normal((11, 11))
    (fit,) = fit_gabors(plane[None])
    bounds = profile_intervals(plane[None], [fit])
    assert fit.r2 > 0.95 and bounds["nx_open"][0]
    assert bounds["nx_high"][0] / bounds["nx_low"][0] > 2
    with pytest.raises(ModelError, match="2 filters but 1 fits"):
        profile_intervals(np.stack([plane, plane]), [fit])


def test_fit_gabor_takes_explicit_starting_points():
    plane = gabor(9, 4.2, 3.6, 40, 0.25, 60, 1.5, 2.0)
    fit = fit_gabor(plane, starts=[[4, 4, math.radians(40), 0.25, 2, 2]])
    assert angle_error(fit.theta_deg, 40) < 0.5 and fit.r2 > 0.999


@pytest.mark.parametrize("colour", [(0.8, 0.5, 0.3), (0.7, -0.6, -0.1)])  # luminance-like and red-green opponent
def test_colour_filters_are_reduced_to_their_gabor_plane(colour):
    rng = np.random.default_rng(1)
    g = gabor(11, 5.2, 4.7, 60, 0.18, 30, 2.2, 3.0)
    weight = np.asarray(colour)[:, None, None] * g + 0.02 * rng.standard_normal((3, 11, 11))
    plane = filter_to_2d(torch.tensor(weight, dtype=torch.float32), mode="pca")
    # the principal colour component is the colour vector, signed towards luminance (or its largest entry)
    assert np.corrcoef(plane.ravel(), g.ravel())[0, 1] > 0.99
    lum = filter_to_2d(weight, mode="luminance")
    assert lum == pytest.approx(0.299 * weight[0] + 0.587 * weight[1] + 0.114 * weight[2])
    (fit,) = fit_gabors(weight[None])  # (K, C, k, k) weights go through the same principal component
    assert fit == fit_gabor(filter_to_2d(weight))
    assert angle_error(fit.theta_deg, 60) < 5
    assert fit.frequency == pytest.approx(0.18, rel=0.05)
    assert fit.nx == pytest.approx(2.2 * 0.18, rel=0.10) and fit.ny == pytest.approx(3.0 * 0.18, rel=0.10)


def test_single_channel_filters_pass_through_and_bad_modes_fail():
    w = np.arange(25.0).reshape(1, 5, 5)
    assert filter_to_2d(w) == pytest.approx(w[0])
    with pytest.raises(ModelError, match="mode must be 'pca' or 'luminance'"):
        filter_to_2d(np.zeros((3, 5, 5)), mode="red")
    with pytest.raises(ModelError, match="needs an RGB filter"):
        filter_to_2d(np.zeros((2, 5, 5)), mode="luminance")


@pytest.mark.parametrize("size,median_below,max_below", [(7, 0.40, 0.50), (11, 0.20, 0.30)])
def test_pure_noise_gets_low_r2(size, median_below, max_below):
    rng = np.random.default_rng(2)
    r2 = np.array([f.r2 for f in fit_gabors(rng.standard_normal((32, size, size)))])
    assert np.median(r2) < median_below and r2.max() < max_below


def test_a_constant_filter_explains_nothing():
    fit = fit_gabors(np.stack([np.zeros((7, 7)), np.full((7, 7), 3.0)]))
    assert [f.r2 for f in fit] == [0.0, 0.0]
    assert all(math.isfinite(v) for f in fit for v in f.to_dict().values())


def test_fits_are_deterministic():
    planes, _ = known_gabors(7, noise=0.1, seed=3)
    assert fit_gabors(planes[:12]) == fit_gabors(planes[:12])


def test_v1_data_is_vonenets_digitisation_of_ringachs_79_cells():
    # n_joint_dist and its edges np.logspace(-1, 0.2, 6) in vonenet/params.py (github.com/dicarlolab/vonenet)
    vonenet = [[2, 0, 1, 0, 0], [8, 9, 4, 1, 0], [1, 2, 19, 17, 3], [0, 0, 1, 7, 4], [0, 0, 0, 0, 0]]
    counts = np.asarray(V1_SIMPLE_CELLS["counts"])
    edges = np.asarray(V1_SIMPLE_CELLS["edges"])
    assert counts.tolist() == vonenet and counts.sum() == 79 == V1_SIMPLE_CELLS["n_cells"]
    assert counts.sum(1).tolist() == [3, 22, 42, 12, 0]  # nx marginal
    assert counts.sum(0).tolist() == [11, 11, 25, 25, 7]  # ny marginal
    assert edges == pytest.approx(10 ** np.linspace(-1, 0.2, 6), rel=1e-12)  # 0.24 decades per bin
    assert edges.round(3).tolist() == [0.100, 0.174, 0.302, 0.525, 0.912, 1.585]
    assert "J Neurophysiol 88:455-463" in V1_SIMPLE_CELLS["citation"]
    assert "dicarlolab/vonenet" in V1_SIMPLE_CELLS["digitised_by"] and "NeurIPS" in V1_SIMPLE_CELLS["digitised_by"]


def draw_from_v1(n, seed):
    """(nx, ny) drawn from V1's own histogram, uniform in log10 within each bin."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(V1_SIMPLE_CELLS["counts"]).ravel()
    logs = np.log10(V1_SIMPLE_CELLS["edges"])
    i, j = np.divmod(rng.choice(25, size=n, p=counts / counts.sum()), 5)
    return 10 ** rng.uniform(logs[i], logs[i + 1]), 10 ** rng.uniform(logs[j], logs[j + 1])


def test_v1_medians_interpolate_in_log_space_within_the_median_bin():
    cmp = compare_with_v1([], [])
    # nx: 3 + 22 cells lie below 10^-0.52 = 0.302, the 39.5th cell is 14.5 of the 42 in [0.302, 0.525)
    assert cmp["v1_median_nx"] == pytest.approx(10 ** (-0.52 + 14.5 / 42 * 0.24))
    # ny: 11 + 11 below, 17.5 of the 25 in [0.302, 0.525)
    assert cmp["v1_median_ny"] == pytest.approx(10 ** (-0.52 + 17.5 / 25 * 0.24))
    assert cmp["n"] == 0 and cmp["median_nx"] is None and cmp["tv_distance"] is None
    json.dumps(cmp, allow_nan=False)


def test_a_sample_from_v1_itself_scores_as_similar():
    cmp = compare_with_v1(*draw_from_v1(64, seed=0))
    assert cmp["share_in_v1_region"] == 1.0  # every draw lies in a bin that holds cells
    assert cmp["outside_bins"] == 0 and sum(map(sum, cmp["binned_counts"])) == 64
    assert cmp["tv_distance"] < 0.3
    assert cmp["tv_permutation_p"] > 0.05
    assert cmp["median_nx"] == pytest.approx(cmp["v1_median_nx"], rel=0.25)
    assert cmp["median_ny"] == pytest.approx(cmp["v1_median_ny"], rel=0.25)


def test_a_far_away_sample_scores_as_different():
    rng = np.random.default_rng(0)
    nx, ny = 10 ** rng.uniform(-0.3, 0.1, 40), 10 ** rng.uniform(-0.9, -0.6, 40)  # wide but short: few V1 cells
    cmp = compare_with_v1(nx, ny)
    assert cmp["share_in_v1_region"] < 0.2
    assert cmp["tv_distance"] > 0.9
    assert cmp["tv_permutation_p"] == pytest.approx(1 / 10000) and cmp["tv_permutation_exceedances"] == 0
    beyond = compare_with_v1([3.0, 0.05, 0.4], [0.4, 0.4, 2.0])  # all beyond the bin range
    assert beyond["outside_bins"] == 3 and beyond["tv_distance"] == 1.0 and beyond["share_in_v1_region"] == 0.0


def test_permutation_p_values_never_claim_more_than_the_permutations_can_show():
    assert format_permutation_p(0, 9999) == "p <= 0.0001"
    assert format_permutation_p(0, 999) == "p <= 0.001"
    assert format_permutation_p(4, 9999) == "p = 0.0005"
    assert format_permutation_p(120, 999) == "p = 0.12"
    assert format_permutation_p(None, 9999) == format_permutation_p(0, 0) == "p n/a"
    rng = np.random.default_rng(0)
    cmp = compare_with_v1(10 ** rng.uniform(-0.3, 0.1, 40), 10 ** rng.uniform(-0.9, -0.6, 40), n_permutations=999)
    assert cmp["tv_permutation_exceedances"] == 0 and cmp["tv_permutation_p"] == pytest.approx(1 / 1000)


def test_the_distance_splits_into_outside_and_in_range_parts():
    rng = np.random.default_rng(7)
    nx, ny = draw_from_v1(30, seed=8)
    nx = np.concatenate([nx, 10 ** rng.uniform(-2, -1.1, 10)])  # 10 filters below the bin range
    ny = np.concatenate([ny, 10 ** rng.uniform(-1, 0, 10)])
    cmp = compare_with_v1(nx, ny, n_permutations=199)
    assert cmp["outside_bins"] == 10 and cmp["n_in_range"] == 30
    assert cmp["tv_from_outside"] == pytest.approx(0.5 * 10 / 40)
    assert cmp["tv_from_outside"] + cmp["tv_from_bins"] == pytest.approx(cmp["tv_distance"], abs=1e-12)
    # the in-range filters alone, renormalised: computed here from the binned counts
    mine = np.asarray(cmp["binned_counts"]).ravel() / 30
    v1 = np.asarray(V1_SIMPLE_CELLS["counts"]).ravel() / 79
    assert cmp["tv_in_range_only"] == pytest.approx(0.5 * np.abs(mine - v1).sum())
    assert cmp["tv_in_range_only"] < cmp["tv_distance"] and cmp["tv_in_range_only_p"] > 0.05
    inside = compare_with_v1(*draw_from_v1(30, seed=8), n_permutations=0)
    assert inside["tv_from_outside"] == 0 and inside["tv_in_range_only"] == inside["tv_distance"]
    assert inside["tv_permutation_p"] is None


def test_bin_edges_are_half_open_except_the_last():
    e = V1_SIMPLE_CELLS["edges"]
    cmp = compare_with_v1([e[0], e[1], e[-1], 0.0999, e[-1] * 1.0001], [e[0], e[0], e[-1], 0.2, 0.2])
    counts = np.asarray(cmp["binned_counts"])
    assert counts[0, 0] == 1 and counts[1, 0] == 1 and counts[4, 4] == 1 and cmp["outside_bins"] == 2


def test_small_filters_are_refused_with_advice():
    with pytest.raises(ModelError) as info:
        analyze_filters(create_model("convnet"))
    message = str(info.value)
    assert message.startswith("first-layer filters are 3x3: Gabor fits need about 5x5 filters or larger")
    assert "convnet has 3x3 filters, too small" in message
    assert "--model resnet18 (7x7 stem)" in message and "11x11 first layer" in message
    with pytest.raises(ModelError, match="4x4: Gabor fits need about 5x5"):
        analyze_filters(torch.zeros(8, 3, 4, 4))
    with pytest.raises(ModelError, match="tolerance is a relative width > 0 .* got 0"):
        analyze_filters(torch.zeros(8, 3, 7, 7), tolerance=0)


def test_the_suggested_large_first_layer_model_builds():
    assert first_conv_weight(create_model("cnn", spec="c64k11s2,p,c128,p,f256")).shape == (64, 3, 11, 11)
    assert first_conv_weight(create_model("resnet18")).shape == (64, 3, 7, 7)


def test_analyze_filters_writes_json_and_figures(tmp_path):
    rng = np.random.default_rng(4)
    planes, _ = known_gabors(7, noise=0.02)
    colours = rng.normal(size=(12, 3))
    weight = np.concatenate(
        [
            colours[:, :, None, None] * planes[::4, None][:12],  # 12 Gabors in colour
            rng.standard_normal((4, 3, 7, 7)),
        ]
    )  # and 4 noise filters
    result = analyze_filters(torch.tensor(weight, dtype=torch.float32), out_dir=tmp_path / "gabor")
    assert result["n_filters"] == 16 and result["filter_shape"] == [3, 7, 7]
    assert result["n_well_fit"] == 12
    assert [f["well_fit"] for f in result["fits"]] == [True] * 12 + [False] * 4
    assert result["comparison"]["n"] == 12
    assert result["shuffle_control"]["n_above_threshold"] <= 1
    files = sorted(p.name for p in (tmp_path / "gabor").iterdir())
    assert files == ["gabor.json", "gabor_fits.png", "v1_comparison.png"]  # no temp files left behind
    for name in ("gabor_fits.png", "v1_comparison.png"):
        assert (tmp_path / "gabor" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "gabor" / "gabor.json").read_text())
    assert saved == json.loads(json.dumps(result, allow_nan=False))
    summary = format_gabor_summary(result)
    assert "12 with R^2 >= 0.5" in summary and "gabor.json" in summary
    # every filter gets 95% profile intervals around its nx and ny; these clean Gabors are all pinned down
    for fit in result["fits"]:
        assert fit["nx_interval"][0] <= fit["nx"] <= fit["nx_interval"][1]
        assert fit["ny_interval"][0] <= fit["ny"] <= fit["ny_interval"][1]
    assert [f["identifiable"] for f in result["fits"][:12]] == [True] * 12
    assert result["identifiability"]["n_well_fit_identifiable"] == result["comparison_identifiable"]["n"] == 12
    assert "identifiable: 12 of 12 have nx and ny pinned down" in summary and "the 12 identifiable ones:" in summary
    assert result["identifiability"]["n_well_fit_identifiable_at"].keys() == {"0.10", "0.20"}
    cmp = result["comparison"]
    assert (
        f"TV distance to V1's binned (nx, ny) {cmp['tv_distance']:.2f} "
        f"({format_permutation_p(cmp['tv_permutation_exceedances'], 9999)}, 9999 permutations)"
    ) in summary


def test_analyze_filters_takes_a_model_and_json_survives_no_well_fit_filter(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn", spec="c6k7,p,f16", in_channels=1, input_size=28)
    result = analyze_filters(model, threshold=0.99, shuffle_control=False)
    assert result["n_filters"] == 6 and result["filter_shape"] == [1, 7, 7] and result["n_well_fit"] == 0
    assert result["comparison_identifiable"]["n"] == 0
    json.dumps(result, allow_nan=False)
    assert "the 0 identifiable ones:\n    nothing to compare" in format_gabor_summary(result)
    plot_v1_comparison(result, tmp_path / "v1.png")  # nothing to scatter: V1 alone
    assert (tmp_path / "v1.png").stat().st_size > 0


def test_plot_gabor_fits_checks_the_number_of_fits(tmp_path):
    planes = np.stack([gabor(7, 3, 3, 0, 0.25, 0, 1.5, 1.5)] * 2)
    fits = fit_gabors(planes)
    plot_gabor_fits(planes, [f.to_dict() for f in fits], tmp_path / "fits.png")
    assert (tmp_path / "fits.png").stat().st_size > 0
    with pytest.raises(ModelError, match="2 filters but 1 fits"):
        plot_gabor_fits(planes, fits[:1], tmp_path / "fits.png")
    assert isinstance(fits[0], GaborFit)


def test_offset_is_fitted_and_can_be_switched_off():
    plane = 2.0 * gabor(9, 4, 4, 100, 0.25, 45, 1.5, 2.0) + 0.7
    with_offset = fit_gabor(plane)
    assert with_offset.offset == pytest.approx(0.7, abs=1e-3) and with_offset.amplitude == pytest.approx(2.0, rel=1e-3)
    assert with_offset.r2 > 0.9999
    assert fit_gabor(plane, offset=False).r2 < 0.9  # the Gabor alone cannot carry a uniform 0.7


def test_more_than_one_chunk_of_filters_keeps_their_order():
    # 130 filters run in chunks of 64; one explicit start each, 10 degrees off, keeps this fast
    thetas = np.linspace(0, 179, 130)
    planes = np.stack([gabor(7, 3, 3, t, 0.25, 0, 1.5, 1.8) for t in thetas])
    fits = fit_gabors(planes, starts=[[[3, 3, math.radians(t + 10), 0.25, 1.5, 1.5]] for t in thetas])
    assert len(fits) == 130
    assert max(angle_error(f.theta_deg, t) for f, t in zip(fits, thetas)) < 0.5
