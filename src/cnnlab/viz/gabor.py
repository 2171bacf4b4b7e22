"""Gabor fits of first-layer filters, compared with macaque V1 simple cells (Ringach 2002, J Neurophysiol 88:455-463).

Model (Ringach's convention: x' runs across the bars, along the carrier; y' runs along the bars)::

    x' =  (x - x0) cos(theta) + (y - y0) sin(theta)
    y' = -(x - x0) sin(theta) + (y - y0) cos(theta)
    g(x, y) = A exp(-x'^2 / (2 sigma_x^2) - y'^2 / (2 sigma_y^2)) cos(2 pi f x' + phi) + offset

x is the column and y the row index, in pixels; f is in cycles/pixel. Ringach's shape parameters are
nx = sigma_x * f (envelope width across the bars, in carrier periods) and ny = sigma_y * f (along them).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..errors import ModelError
from ..files import save_atomic
from .figure import finish, subplots

__all__ = [
    "GaborFit", "V1_SIMPLE_CELLS", "gabor_image", "filter_to_2d", "fit_gabor", "fit_gabors", "first_conv_weight",
    "compare_with_v1", "analyze_filters", "format_gabor_summary", "plot_v1_comparison", "plot_gabor_fits",
]

# Ringach (2002): 79 simple cells binned on log-spaced (nx, ny), as digitised for the lecture.
# Rows are nx bins (low -> high), columns ny bins (low -> high); both use the same edges.
V1_SIMPLE_CELLS = {
    "citation": "Ringach DL (2002) Spatial structure and symmetry of simple-cell receptive fields in macaque "
                "primary visual cortex. J Neurophysiol 88:455-463",
    "edges": [0.100, 0.174, 0.302, 0.525, 0.912, 1.585],
    "counts": [[2, 0, 1, 0, 0],
               [8, 9, 4, 1, 0],
               [1, 2, 19, 17, 3],
               [0, 0, 1, 7, 4],
               [0, 0, 0, 0, 0]],
    "n_cells": 79,
}
assert sum(map(sum, V1_SIMPLE_CELLS["counts"])) == V1_SIMPLE_CELLS["n_cells"], "V1 table does not sum to 79"

# R^2 for a filter to count as Gabor-like. White-noise filters reach a median R^2 of ~0.16 at 11x11 but ~0.31
# at 7x7 (up to ~0.48 among 64): at 7x7, 0.5 is only just above chance, hence the shuffle control in analyze_filters.
DEFAULT_THRESHOLD = 0.5
# cycles/pixel: keeps f > 0 and the fit well-conditioned; an 11-pixel patch holds a tenth of a cycle at this f,
# so a lower f could not be told from a plain envelope anyway
F_MIN = 0.01
V1_REGION_DEFINITION = ("union of the 5x5 (nx, ny) bins holding at least one of Ringach's 79 cells "
                        f"({sum(c > 0 for row in V1_SIMPLE_CELLS['counts'] for c in row)} of 25 bins)")
V1_MEDIAN_METHOD = ("grouped median: cells spread uniformly in log10 within their bin, interpolated at the "
                    "N/2-th cell of the marginal counts")
STATISTIC_DEFINITION = (
    "total variation distance 0.5 * sum |p - q| between the filters' and V1's binned (nx, ny) distributions over "
    "26 categories: the 25 bins plus one 'outside' category for points beyond the bin range (V1 has none there); "
    "0 = identical, 1 = disjoint. p-value: two-sample permutation test of the same distance, pooling the filters "
    "with the 79 cells' bin labels; p = (1 + #{permuted >= observed}) / (1 + n_permutations)")

_N_PARAMS = 9  # x0, y0, theta, f, sigma_x, sigma_y, a, b, offset; a cos(u) + b sin(u) = A cos(u + phi)


@dataclass(frozen=True)
class GaborFit:
    """One fitted Gabor in the filter's own units; angles in degrees, lengths in pixels, f in cycles/pixel."""

    x0: float
    y0: float
    theta_deg: float  # in [0, 180): the carrier's direction (across the bars), from +x towards +y (down the rows)
    frequency: float
    phase_deg: float  # in (-180, 180]
    sigma_x: float
    sigma_y: float
    amplitude: float
    offset: float
    r2: float  # 1 - SS_res / SS_tot over the filter's pixels

    @property
    def nx(self) -> float:
        return self.sigma_x * self.frequency

    @property
    def ny(self) -> float:
        return self.sigma_y * self.frequency

    def to_dict(self) -> dict:
        return {**asdict(self), "nx": self.nx, "ny": self.ny}


def _field(fit, name):
    return fit[name] if isinstance(fit, dict) else getattr(fit, name)


def gabor_image(fit: GaborFit | dict, shape: tuple[int, int]) -> np.ndarray:
    """The fitted Gabor evaluated on an (h, w) pixel grid."""
    p = np.array([_field(fit, "x0"), _field(fit, "y0"), math.radians(_field(fit, "theta_deg")),
                  _field(fit, "frequency"), _field(fit, "sigma_x"), _field(fit, "sigma_y"), 0.0, 0.0,
                  _field(fit, "offset")])
    phase = math.radians(_field(fit, "phase_deg"))
    p[6], p[7] = _field(fit, "amplitude") * math.cos(phase), -_field(fit, "amplitude") * math.sin(phase)
    xs, ys = _grid(shape)
    return _model(p[None], xs, ys)[0].reshape(shape)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return xs.ravel(), ys.ravel()


def _parts(p: np.ndarray, xs: np.ndarray, ys: np.ndarray):
    """Shared intermediate terms of the model for a batch of parameter vectors p (B, 9); pixels (N,)."""
    x0, y0, th, f, sx, sy, a, b, c = (p[:, i:i + 1] for i in range(_N_PARAMS))
    cos_t, sin_t = np.cos(th), np.sin(th)
    dx, dy = xs[None] - x0, ys[None] - y0
    xp = dx * cos_t + dy * sin_t
    yp = -dx * sin_t + dy * cos_t
    env = np.exp(-0.5 * (xp / sx) ** 2 - 0.5 * (yp / sy) ** 2)
    u = 2 * np.pi * f * xp
    cu, su = np.cos(u), np.sin(u)
    return x0, y0, th, f, sx, sy, a, b, c, cos_t, sin_t, xp, yp, env, cu, su


def _model(p: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    *_, a, b, c, _, _, _, _, env, cu, su = _parts(p, xs, ys)
    return env * (a * cu + b * su) + c


def _model_and_jacobian(p: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model (B, N) and its analytic Jacobian (B, 9, N), parameters before pixels so each row is contiguous."""
    x0, y0, th, f, sx, sy, a, b, c, cos_t, sin_t, xp, yp, env, cu, su = _parts(p, xs, ys)
    carrier = a * cu + b * su
    d_carrier = b * cu - a * su  # d carrier / du
    g = env * carrier + c
    # derivatives with respect to the rotated coordinates, then chained to x0, y0 and theta
    g_xp = env * (-xp / sx ** 2 * carrier + 2 * np.pi * f * d_carrier)
    g_yp = env * (-yp / sy ** 2 * carrier)
    env_carrier = env * carrier
    jac = np.empty((g.shape[0], _N_PARAMS, g.shape[1]))
    jac[:, 0] = -cos_t * g_xp + sin_t * g_yp
    jac[:, 1] = -sin_t * g_xp - cos_t * g_yp
    jac[:, 2] = yp * g_xp - xp * g_yp  # d xp/d theta = yp, d yp/d theta = -xp
    jac[:, 3] = env * d_carrier * 2 * np.pi * xp
    jac[:, 4] = env_carrier * xp ** 2 / sx ** 3
    jac[:, 5] = env_carrier * yp ** 2 / sy ** 3
    jac[:, 6] = env * cu
    jac[:, 7] = env * su
    jac[:, 8] = 1.0
    return g, jac


def _bounds(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    k = max(h, w)
    inf = np.inf
    lo = np.array([0.0, 0.0, -inf, F_MIN, 0.5, 0.5, -inf, -inf, -inf])
    hi = np.array([w - 1.0, h - 1.0, inf, 0.5, float(k), float(k), inf, inf, inf])
    return lo, hi


def _solve_linear(p: np.ndarray, xs, ys, data: np.ndarray, offset: bool) -> np.ndarray:
    """Set a, b (and the offset) to their least-squares values for the other parameters: removes the phase
    and amplitude from the search, so starting points need only the nonlinear parameters."""
    *_, env, cu, su = _parts(p, xs, ys)
    cols = [env * cu, env * su] + ([np.ones_like(env)] if offset else [])
    basis = np.stack(cols, axis=-1)  # (B, N, 2 or 3)
    gram = basis.transpose(0, 2, 1) @ basis + 1e-9 * np.eye(len(cols))
    coef = np.linalg.solve(gram, (basis.transpose(0, 2, 1) @ data[..., None]))[..., 0]
    p = p.copy()
    p[:, 6], p[:, 7] = coef[:, 0], coef[:, 1]
    p[:, 8] = coef[:, 2] if offset else 0.0
    return p


def _levenberg_marquardt(p, lo, hi, xs, ys, data, free, iterations):
    """Batched Levenberg-Marquardt with Marquardt's diagonal scaling; steps are clipped to the bounds and
    kept only where they lower the cost. Every problem (row of p) runs independently."""
    p = np.clip(p, lo, hi)
    g, jac = _model_and_jacobian(p, xs, ys)
    jac *= free[:, None]  # a fixed parameter gets a zero row, hence a zero step
    jtj = jac @ jac.transpose(0, 2, 1)
    grad = (jac @ (g - data)[..., None])[..., 0]
    cost = ((g - data) ** 2).sum(1)
    lam = np.full(len(p), 1e-3)
    active = np.ones(len(p), dtype=bool)
    eye = np.eye(_N_PARAMS)
    for _ in range(iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        diag = np.maximum(np.diagonal(jtj[idx], axis1=1, axis2=2), 1e-9)
        step = np.linalg.solve(jtj[idx] + lam[idx, None, None] * diag[:, :, None] * eye, -grad[idx, :, None])[..., 0]
        trial = np.clip(p[idx] + step, lo, hi)
        cost_t = ((_model(trial, xs, ys) - data[idx]) ** 2).sum(1)
        better = cost_t < cost[idx]
        gain = np.where(better, (cost[idx] - cost_t) / np.maximum(cost[idx], 1e-300), 0.0)
        take = idx[better]
        if take.size:  # the Jacobian only where a step was accepted: rejected ones keep theirs
            p[take], cost[take] = trial[better], cost_t[better]
            g_t, jac_t = _model_and_jacobian(p[take], xs, ys)
            jac_t *= free[:, None]
            jtj[take] = jac_t @ jac_t.transpose(0, 2, 1)
            grad[take] = (jac_t @ (g_t - data[take])[..., None])[..., 0]
        lam[idx] = np.where(better, np.maximum(lam[idx] * 0.3, 1e-9), lam[idx] * 5.0)
        # converged: an accepted step that no longer lowers the cost, or a damping so large no step is taken
        done = (better & (gain < 1e-10)) | (lam[idx] > 1e8)
        active[idx[done]] = False
    return p, cost


def _default_starts(z: np.ndarray) -> np.ndarray:
    """Starting points (K, S, 6) for x0, y0, theta, f, sigma_x, sigma_y: 4 orientations x 3 frequencies around
    the peak of the zero-padded power spectrum, x 2 envelope sizes x 2 centres (energy centroid, patch centre)."""
    n, h, w = z.shape
    k = max(h, w)
    pad = max(64, 4 * k)  # zero-padding interpolates the spectrum finely enough to place the peak
    power = np.abs(np.fft.rfft2(z, s=(pad, pad))) ** 2
    fy, fx = np.fft.fftfreq(pad)[:, None], np.fft.rfftfreq(pad)[None, :]
    radius = np.hypot(fx, fy)
    power = np.where((radius >= F_MIN) & (radius <= 0.5), power, -1.0)
    peak = power.reshape(n, -1).argmax(1)
    f0 = radius.ravel()[peak]
    fy_b, fx_b = np.broadcast_arrays(fy, fx)
    theta0 = np.arctan2(fy_b.ravel()[peak], fx_b.ravel()[peak])

    energy = z ** 2
    energy = energy / np.maximum(energy.sum((1, 2), keepdims=True), 1e-300)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (energy * xs).sum((1, 2)), (energy * ys).sum((1, 2))
    vxx = (energy * (xs - cx[:, None, None]) ** 2).sum((1, 2))
    vyy = (energy * (ys - cy[:, None, None]) ** 2).sum((1, 2))
    vxy = (energy * (xs - cx[:, None, None]) * (ys - cy[:, None, None])).sum((1, 2))

    starts = []
    for d_theta in np.arange(4) * np.pi / 4:
        th = theta0 + d_theta
        c, s = np.cos(th), np.sin(th)
        # the energy (envelope squared) has variance sigma^2 / 2 along each axis of the envelope
        var_par = c * c * vxx + 2 * c * s * vxy + s * s * vyy
        var_perp = s * s * vxx - 2 * c * s * vxy + c * c * vyy
        moment_sigmas = (np.sqrt(2 * var_par), np.sqrt(2 * var_perp))
        for f_scale in (0.6, 1.0, 1.5):
            f = np.clip(f0 * f_scale, F_MIN, 0.5)
            for sx, sy in (moment_sigmas, (np.full(n, k / 4), np.full(n, k / 4))):
                for x0, y0 in ((cx, cy), (np.full(n, (w - 1) / 2), np.full(n, (h - 1) / 2))):
                    starts.append(np.stack([x0, y0, th, f, sx, sy], axis=1))
    return np.stack(starts, axis=1)


def _to_fits(p: np.ndarray, cost: np.ndarray, z_sstot: np.ndarray, scale: np.ndarray, mean: np.ndarray):
    fits = []
    for i in range(len(p)):
        x0, y0, th, f, sx, sy, a, b, c = p[i]
        phase = math.atan2(-b, a)  # a cos u + b sin u = A cos(u + phase)
        th = math.remainder(th, 2 * math.pi)
        if th < 0:  # theta and theta + pi describe the same Gabor with x' -> -x', i.e. phase -> -phase
            th, phase = th + math.pi, -phase
        if th >= math.pi:
            th, phase = th - math.pi, -phase
        r2 = 1.0 - cost[i] / z_sstot[i] if z_sstot[i] > 0 else 0.0
        fits.append(GaborFit(
            x0=float(x0), y0=float(y0), theta_deg=math.degrees(th) % 180.0, frequency=float(f),
            phase_deg=math.degrees(math.remainder(phase, 2 * math.pi)), sigma_x=float(sx), sigma_y=float(sy),
            amplitude=float(math.hypot(a, b) * scale[i]), offset=float(c * scale[i] + mean[i]), r2=float(r2)))
    return fits


def fit_gabors(weights, starts: np.ndarray | None = None, offset: bool = True, mode: str = "pca", keep: int = 4,
               iterations: int = 200) -> list[GaborFit]:
    """Least-squares Gabor fits of K filters at once, each from several starting points.

    `weights` are first-layer weights (K, C, kh, kw), made 2D by `filter_to_2d(..., mode)`, or 2D planes
    (K, kh, kw). `starts` (S, 6) or (K, S, 6) gives x0, y0, theta (rad), f, sigma_x, sigma_y to start from
    (default: an FFT-seeded grid of 48); amplitude, phase and offset enter linearly and start at their
    least-squares values, so phases need no grid. All starts run 25 iterations, the `keep` best per filter
    run to convergence. Deterministic: no random numbers.
    """
    planes = _as_numpy(weights)
    if planes.ndim == 4:
        planes = np.stack([filter_to_2d(f, mode=mode) for f in planes])
    if planes.ndim != 3:
        raise ModelError(f"fit_gabors expects filters (K, C, kh, kw) or 2D planes (K, kh, kw), "
                         f"got shape {tuple(planes.shape)}")
    n, h, w = planes.shape
    # fit in units of each filter's standard deviation, so damping and tolerances do not depend on the scale;
    # without an offset parameter the mean stays in the data, for the Gabor alone to explain
    mean = planes.mean((1, 2)) if offset else np.zeros(n)
    scale = planes.std((1, 2))
    flat = scale == 0  # a constant filter: nothing to explain
    scale = np.where(flat, 1.0, scale)
    z = (planes - mean[:, None, None]) / scale[:, None, None]
    if starts is None:
        starts = _default_starts(z - z.mean((1, 2), keepdims=True))
    starts = np.asarray(starts, dtype=np.float64)
    if starts.ndim == 2:
        starts = np.broadcast_to(starts, (n,) + starts.shape)
    if starts.ndim != 3 or starts.shape[0] != n or starts.shape[2] != 6:
        raise ModelError(f"starts must be (S, 6) or ({n}, S, 6) for x0, y0, theta, f, sigma_x, sigma_y; "
                         f"got {starts.shape}")
    data = z.reshape(n, -1)
    # chunks of 64 filters keep the Jacobians (filters x starts x 9 x pixels) to some tens of MB
    params, costs = zip(*(_fit_chunk(data[i:i + 64], starts[i:i + 64], (h, w), offset, keep, iterations)
                          for i in range(0, n, 64)))
    sstot = ((data - data.mean(1, keepdims=True)) ** 2).sum(1) * ~flat
    return _to_fits(np.concatenate(params), np.concatenate(costs), sstot, scale, mean)


def _fit_chunk(data, starts, shape, offset, keep, iterations):
    n, n_starts = starts.shape[:2]
    xs, ys = _grid(shape)
    lo, hi = _bounds(shape)
    free = np.ones(_N_PARAMS)
    free[8] = float(offset)
    p = np.zeros((n * n_starts, _N_PARAMS))
    p[:, :6] = np.clip(starts.reshape(-1, 6), lo[:6], hi[:6])
    rows = np.repeat(data, n_starts, axis=0)
    p = _solve_linear(p, xs, ys, rows, offset)
    p, cost = _levenberg_marquardt(p, lo, hi, xs, ys, rows, free, iterations=25)

    keep = min(keep, n_starts)
    order = np.argsort(cost.reshape(n, n_starts), axis=1, kind="stable")[:, :keep]
    best = p.reshape(n, n_starts, _N_PARAMS)[np.arange(n)[:, None], order].reshape(-1, _N_PARAMS)
    p, cost = _levenberg_marquardt(best, lo, hi, xs, ys, np.repeat(data, keep, axis=0), free, iterations)
    winner = cost.reshape(n, keep).argmin(1)
    return p.reshape(n, keep, _N_PARAMS)[np.arange(n), winner], cost.reshape(n, keep)[np.arange(n), winner]


def fit_gabor(patch2d, starts: np.ndarray | None = None, offset: bool = True) -> GaborFit:
    """Least-squares Gabor fit of one 2D filter (h, w); `starts` (S, 6) as in `fit_gabors`."""
    patch2d = _as_numpy(patch2d)
    if patch2d.ndim != 2:
        raise ModelError(f"fit_gabor expects one 2D filter (h, w), got shape {tuple(patch2d.shape)}")
    return fit_gabors(patch2d[None], starts, offset=offset)[0]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for R, G, B


def filter_to_2d(weight, mode: str = "pca") -> np.ndarray:
    """One filter (C, k, k) as a 2D plane: the plane itself for C == 1; otherwise its projection on the first
    principal component of the per-pixel colour vectors (`mode="pca"`) or on BT.601 luminance (`"luminance"`)."""
    w = _as_numpy(weight)
    if w.ndim != 3:
        raise ModelError(f"filter_to_2d expects one filter (C, k, k), got shape {tuple(w.shape)}")
    if mode not in ("pca", "luminance"):
        raise ModelError(f"mode must be 'pca' or 'luminance', got {mode!r}")
    c = w.shape[0]
    if c == 1:
        return w[0].copy()
    if mode == "luminance":
        if c != 3:
            raise ModelError(f"mode='luminance' needs an RGB filter (3 channels), got {c}; use mode='pca'")
        return np.tensordot(np.asarray(LUMINANCE), w, axes=1)
    colours = w.reshape(c, -1).T  # (pixels, C)
    # centred PCA: the colour direction along which the filter's spatial pattern varies most; a uniform
    # colour cast (the mean) would otherwise pull the component towards itself
    _, _, vt = np.linalg.svd(colours - colours.mean(0), full_matrices=False)
    direction = vt[0]
    # the component's sign is arbitrary: point it towards luminance (all channels positive) so that a
    # luminance filter keeps its polarity; for an opponent colour direction, make its largest entry positive
    lum = direction.sum()
    if abs(lum) > 1e-6 * np.abs(direction).sum():
        direction = direction * np.sign(lum)
    else:
        direction = direction * np.sign(direction[np.argmax(np.abs(direction))])
    return (colours @ direction).reshape(w.shape[1:])


def first_conv_weight(model: torch.nn.Module) -> torch.Tensor:
    """The weight (K, C, kh, kw) of the model's first Conv2d, in registration order."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.weight.detach()
    raise ModelError(f"{type(model).__name__} has no Conv2d layer to analyse")


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value on [e_i, e_i+1) (the last bin closed), or -1 outside the edges."""
    idx = np.searchsorted(edges, values, side="right") - 1
    idx = np.where(values == edges[-1], len(edges) - 2, idx)
    return np.where((values >= edges[0]) & (values <= edges[-1]), idx, -1)


def _grouped_median(counts: np.ndarray, edges: np.ndarray) -> float:
    """Median of binned data, spreading each bin's cells uniformly in log10 between its edges."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    half = total / 2
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, half))  # first bin whose cumulative count reaches N/2
    below = cum[i] - counts[i]
    lo, hi = np.log10(edges[i]), np.log10(edges[i + 1])
    return float(10 ** (lo + (half - below) / counts[i] * (hi - lo)))


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total variation distance between count vectors along the last axis."""
    return 0.5 * np.abs(a / a.sum(-1, keepdims=True) - b / b.sum(-1, keepdims=True)).sum(-1)


def compare_with_v1(nx, ny, n_permutations: int = 9999, seed: int = 0) -> dict:
    """Compare (nx, ny) of well-fit filters with Ringach's 79 V1 simple cells; returns a JSON-serialisable dict."""
    nx, ny = np.asarray(nx, dtype=np.float64).ravel(), np.asarray(ny, dtype=np.float64).ravel()
    if nx.shape != ny.shape:
        raise ModelError(f"nx and ny must have the same length, got {nx.size} and {ny.size}")
    edges = np.asarray(V1_SIMPLE_CELLS["edges"])
    v1 = np.asarray(V1_SIMPLE_CELLS["counts"])
    nb = len(edges) - 1
    ix, iy = _bin_index(nx, edges), _bin_index(ny, edges)
    inside = (ix >= 0) & (iy >= 0)
    labels = np.where(inside, ix * nb + iy, nb * nb)  # category nb*nb: outside the bin range
    counts = np.bincount(labels, minlength=nb * nb + 1)
    region = (v1 > 0).ravel()
    n = int(nx.size)
    result = {
        "n": n,
        "nx": nx.tolist(), "ny": ny.tolist(),
        "median_nx": float(np.median(nx)) if n else None,
        "median_ny": float(np.median(ny)) if n else None,
        "v1_median_nx": _grouped_median(v1.sum(1), edges),
        "v1_median_ny": _grouped_median(v1.sum(0), edges),
        "v1_median_method": V1_MEDIAN_METHOD,
        "binned_counts": counts[:-1].reshape(nb, nb).tolist(),
        "outside_bins": int(counts[-1]),
        "share_in_v1_region": float(region[labels[inside]].sum() / n) if n else None,
        "v1_region_definition": V1_REGION_DEFINITION,
        "tv_distance": None, "tv_permutation_p": None, "n_permutations": int(n_permutations),
        "statistic_definition": STATISTIC_DEFINITION,
    }
    if n == 0:
        return result
    v1_counts = np.append(v1.ravel(), 0)
    observed = float(_tv(counts, v1_counts))
    result["tv_distance"] = observed
    if n_permutations > 0:
        pooled = np.concatenate([labels, np.repeat(np.arange(nb * nb + 1), v1_counts)])
        rng = np.random.default_rng(seed)
        perm = np.argsort(rng.random((n_permutations, pooled.size)), axis=1)
        shuffled = pooled[perm]
        rows = np.arange(n_permutations)[:, None] * (nb * nb + 1)
        first = np.bincount((rows + shuffled[:, :n]).ravel(), minlength=n_permutations * (nb * nb + 1))
        second = np.bincount((rows + shuffled[:, n:]).ravel(), minlength=n_permutations * (nb * nb + 1))
        null = _tv(first.reshape(n_permutations, -1), second.reshape(n_permutations, -1))
        # a small tolerance so that ties in floating point count as ties
        result["tv_permutation_p"] = float((1 + (null >= observed - 1e-12).sum()) / (1 + n_permutations))
    return result


def analyze_filters(weight, out_dir: Path | str | None = None, threshold: float = DEFAULT_THRESHOLD,
                    min_size: int = 5, mode: str = "pca", shuffle_control: bool = True, seed: int = 0) -> dict:
    """Fit a Gabor to each first-layer filter (K, C, kh, kw) (or a model's first Conv2d), compare the well-fit
    ones (R^2 >= threshold) with V1 simple cells; with `out_dir`, also write gabor.json, gabor_fits.png and
    v1_comparison.png. `shuffle_control` also fits the filters with their pixels shuffled: the R^2 that
    chance reaches at this filter size (white noise reaches ~0.2 at 11x11 but ~0.45 at 7x7)."""
    if isinstance(weight, torch.nn.Module):
        weight = first_conv_weight(weight)
    w = _as_numpy(weight)
    if w.ndim != 4:
        raise ModelError(f"expected first-layer weights (K, C, kh, kw), got shape {tuple(w.shape)}")
    k, c, kh, kw = w.shape
    if min(kh, kw) < min_size:
        raise ModelError(
            f"first-layer filters are {kh}x{kw}: Gabor fits need about {min_size}x{min_size} filters or larger "
            f"to show an envelope and bars, and the lecture's convnet has 3x3 filters, too small for this. "
            f"Train a model with a large first layer, e.g. --model resnet18 (7x7 stem) or a traditional CNN with "
            f"an 11x11 first layer (--model cnn --model-arg spec=c64k11s2,p,c128,p,f256), and analyse that.")
    if not 0 <= threshold < 1:
        raise ModelError(f"threshold is an R^2 in [0, 1), got {threshold}")
    if mode not in ("pca", "luminance"):
        raise ModelError(f"mode must be 'pca' or 'luminance', got {mode!r}")
    planes = np.stack([filter_to_2d(w[i], mode=mode) for i in range(k)])
    fits = fit_gabors(planes)
    well = [f for f in fits if f.r2 >= threshold]
    comparison = compare_with_v1([f.nx for f in well], [f.ny for f in well])
    result = {
        "n_filters": k,
        "filter_shape": [c, kh, kw],
        "colour_mode": mode if c > 1 else "single channel",
        "threshold_r2": threshold,
        "n_well_fit": len(well),
        "median_r2": float(np.median([f.r2 for f in fits])),
        "fits": [{"index": i, **f.to_dict(), "well_fit": f.r2 >= threshold} for i, f in enumerate(fits)],
        "comparison": comparison,
        "shuffle_control": None,
        "v1": copy.deepcopy(V1_SIMPLE_CELLS),
        "model": ("g = A exp(-x'^2/(2 sigma_x^2) - y'^2/(2 sigma_y^2)) cos(2 pi f x' + phase) + offset, "
                  "x' across the bars; nx = sigma_x f, ny = sigma_y f (Ringach 2002)"),
    }
    if shuffle_control:
        # same pixel values, no spatial structure: how many filters would pass the threshold by chance
        shuffled = np.random.default_rng(seed).permuted(planes.reshape(k, -1), axis=1).reshape(planes.shape)
        r2 = np.array([f.r2 for f in fit_gabors(shuffled)])
        result["shuffle_control"] = {
            "definition": f"each filter's 2D plane with its pixels randomly permuted (seed {seed}), then fitted",
            "median_r2": float(np.median(r2)),
            "p95_r2": float(np.percentile(r2, 95)),
            "n_above_threshold": int((r2 >= threshold).sum()),
        }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_gabor_fits(planes, fits, out / "gabor_fits.png", threshold=threshold)
        plot_v1_comparison(result, out / "v1_comparison.png")
        result["files"] = {name: str(out / name) for name in ("gabor.json", "gabor_fits.png", "v1_comparison.png")}
        save_atomic(json.dumps(result, indent=1).encode(), out / "gabor.json")
    return result


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pct(share) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def format_gabor_summary(result: dict) -> str:
    """A few lines for the command line: how many filters are Gabor-like and how they compare with V1."""
    cmp = result["comparison"]
    c, kh, kw = result["filter_shape"]
    lines = [
        f"Gabor fits of {result['n_filters']} first-layer filters ({c}x{kh}x{kw}, {result['colour_mode']}): "
        f"{result['n_well_fit']} with R^2 >= {result['threshold_r2']:g} (median R^2 {result['median_r2']:.2f})",
        f"  median nx = sigma_x*f: {_fmt(cmp['median_nx'])} (V1 {cmp['v1_median_nx']:.2f}), "
        f"median ny = sigma_y*f: {_fmt(cmp['median_ny'])} (V1 {cmp['v1_median_ny']:.2f})",
        f"  inside the V1 region: {_pct(cmp['share_in_v1_region'])} "
        f"of the well-fit filters ({cmp['outside_bins']} outside the bin range)",
        f"  total variation distance to V1's binned (nx, ny): {_fmt(cmp['tv_distance'])} "
        f"(0 = same, 1 = disjoint; permutation p = {_fmt(cmp['tv_permutation_p'], '.3g')})",
    ]
    control = result.get("shuffle_control")
    if control:
        lines.insert(1, f"  chance level: {control['n_above_threshold']} of {result['n_filters']} pixel-shuffled "
                        f"filters reach R^2 >= {result['threshold_r2']:g} "
                        f"(95th percentile R^2 {control['p95_r2']:.2f})")
    if "files" in result:
        lines.append("  wrote " + ", ".join(result["files"].values()))
    return "\n".join(lines)


def plot_v1_comparison(result: dict, path: Path | str | None = None, title: str = "") -> Figure:
    """The well-fit filters' (nx, ny) on log-log axes over Ringach's V1 histogram (counts in the cells)."""
    cmp = result.get("comparison", result)
    edges = np.asarray(V1_SIMPLE_CELLS["edges"])
    v1 = np.asarray(V1_SIMPLE_CELLS["counts"])
    nx, ny = np.asarray(cmp["nx"]), np.asarray(cmp["ny"])
    fig, ax = subplots(figsize=(6.4, 5.6))
    # rows of the table are nx (x axis), so the mesh takes the transpose: C[y, x]
    mesh = ax.pcolormesh(edges, edges, v1.T, cmap="Blues", vmin=0, vmax=v1.max(), edgecolors="0.75",
                         linewidth=0.5)
    fig.colorbar(mesh, ax=ax, fraction=0.046, label="V1 simple cells per bin")
    # counts in each cell's upper-right corner, where the filters' points are least likely to hide them
    corner = edges[1:] / 1.04
    for i in range(len(corner)):
        for j in range(len(corner)):
            ax.text(corner[i], corner[j], str(v1[i, j]), ha="right", va="top", fontsize=7,
                    zorder=4, color="white" if v1[i, j] > v1.max() / 2 else "0.25")
    if nx.size:
        ax.scatter(nx, ny, s=28, marker="o", facecolor="#E69F00", edgecolor="black", linewidth=0.6, zorder=3)
    lo = min(edges[0], *(nx[nx > 0] if nx.size else [edges[0]]), *(ny[ny > 0] if ny.size else [edges[0]])) / 1.3
    hi = max(edges[-1], *(nx if nx.size else [0]), *(ny if ny.size else [0])) * 1.3
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.plot([lo, hi], [lo, hi], color="0.5", linestyle=":", linewidth=0.8, zorder=2)
    ax.set_xlabel("nx = sigma_x * f  (envelope width across the bars, in carrier periods)")
    ax.set_ylabel("ny = sigma_y * f  (envelope length along the bars, in periods)")
    threshold = result.get("threshold_r2")
    handles = [
        Patch(facecolor=colormaps["Blues"](0.6), edgecolor="0.75",
              label=f"V1 simple cells, Ringach 2002 (n={V1_SIMPLE_CELLS['n_cells']})"),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="#E69F00", markeredgecolor="black",
                   label=f"learned filters{f', R^2 >= {threshold:g}' if threshold is not None else ''} (n={nx.size})"),
        Line2D([], [], color="0.5", linestyle=":", label="nx = ny"),
    ]
    # legend and numbers below the axes, so that no V1 count is hidden
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(-0.02, -0.1), fontsize=8, frameon=False)
    share = cmp["share_in_v1_region"]
    ax.text(0.0, -0.25,
            f"median nx {_fmt(cmp['median_nx'])} (V1 {cmp['v1_median_nx']:.2f}), "
            f"median ny {_fmt(cmp['median_ny'])} (V1 {cmp['v1_median_ny']:.2f}); "
            f"in the V1 region (bins with cells): {_pct(share)}; "
            f"{cmp['outside_bins']} outside the bins\n"
            f"total variation distance of the binned distributions {_fmt(cmp['tv_distance'])} "
            f"(0 = same, 1 = disjoint), permutation p = {_fmt(cmp['tv_permutation_p'], '.3g')}",
            transform=ax.transAxes, ha="left", va="top", fontsize=7.5)
    ax.set_title(title or "First-layer filters vs macaque V1 simple cells (Ringach 2002)")
    return finish(fig, path)


def plot_gabor_fits(weights, fits, path: Path | str | None = None, mode: str = "pca",
                    threshold: float = DEFAULT_THRESHOLD, title: str = "") -> Figure:
    """A grid with, for each filter, its 2D plane next to the fitted Gabor, with R^2 above the pair.

    `weights` is (K, C, kh, kw) first-layer weights or (K, kh, kw) planes already made 2D; `fits` are
    `GaborFit`s or their dicts. Each pair shares a symmetric grey scale; R^2 below `threshold` is grey."""
    w = _as_numpy(weights)
    planes = w if w.ndim == 3 else np.stack([filter_to_2d(f, mode=mode) for f in w])
    n, h, wd = planes.shape
    if len(fits) != n:
        raise ModelError(f"{n} filters but {len(fits)} fits")
    # one mosaic image instead of 2K small axes: an order of magnitude faster to draw with Agg
    per_row = min(n, 8)
    rows = -(-n // per_row)
    gap, pair_gap, label = 1, 3, max(3, h // 2)  # pixels: filter|model, between pairs, room for the R^2 text
    cell_w, cell_h = 2 * wd + gap + pair_gap, h + label
    mosaic = np.full((rows * cell_h, per_row * cell_w - pair_gap), np.nan)
    inches = 0.9 / (2 * wd + gap)  # about 0.45 inch per filter image
    fig, ax = subplots(figsize=(min(inches * mosaic.shape[1] + 0.4, 16), min(inches * mosaic.shape[0] + 0.6, 16)))
    for i, (plane, fit) in enumerate(zip(planes, fits)):
        r, c = divmod(i, per_row)
        model = gabor_image(fit, plane.shape)
        vmax = max(np.abs(plane).max(), np.abs(model).max(), 1e-12)
        top, left = r * cell_h + label, c * cell_w
        mosaic[top:top + h, left:left + wd] = plane / vmax
        mosaic[top:top + h, left + wd + gap:left + 2 * wd + gap] = model / vmax
        r2 = _field(fit, "r2")
        ax.text(left - 0.5, top - 0.9, f"{i}: R²={r2:.2f}", fontsize=6, va="bottom", ha="left",
                color="black" if r2 >= threshold else "0.55")
    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title or f"First-layer filters (left of each pair) and fitted Gabors (right); "
                          f"grey R² < {threshold:g}", fontsize=9)
    return finish(fig, path)
