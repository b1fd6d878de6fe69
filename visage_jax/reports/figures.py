"""Every figure of the project: 1D / 2D / 3D figures of a saved safety landscape (a run's
landscape.json), like Peng et al. Fig. 1, with each model judge's 1D ASR dashed beside the keyword
curve (Figs. 5-6; 2D figures show the keyword ASR only); a sweep's runs on one axes; the walls of
a census and of structured directions (`visage-jax walls`); the experiments' curves and capability
plot; a fine-tuning loss curve. Callers pass data and a path.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, so plotting never touches
pyplot's global state and is safe inside a long-running sweep.
"""

import os

import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

from visage_jax import result, rundir
from visage_jax.analysis import census, visage

DPI = 150
CMAP = "viridis_r"   # dark = jailbroken, bright = safe
NONFINITE_STYLE = dict(marker="x", color="red", s=60, linewidths=2, zorder=5, clip_on=False,
                       label="inf/NaN logits")
JUDGE_STYLES = ("--", "-.", ":")  # model judges (judging.py): dashed beside the keyword curve
CAPABILITY_LABELS = dict(perplexity="perplexity of reference answers", mc_accuracy="multiple-choice accuracy")


def _partial(r: result.Result) -> bool:
  return not r.complete or bool(np.isnan(r.asr).any())


def _header(r: result.Result) -> str:
  model = r.model or "unknown model"
  model = os.path.basename(model.rstrip("/")) or model
  status = "  [partial]" if _partial(r) else ""
  n = f"  ·  {r.n_prompts} prompts" if r.n_prompts is not None else ""
  return f"{model}  ·  {r.vis_type}{n}{status}"


def _visage_text(v: result.Visage, with_ci: bool = True) -> str:
  """The stored score, not a recomputation: a partial run's score is whatever landscape saved;
  with its 95% interval when the run has one."""
  ci = v.ci95 if with_ci else None
  score = lambda x: f"{x:.2f}" if ci is None else f"{x:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
  if v.mean is None:
    return "VISAGE n/a"
  text = f"VISAGE {score(v.mean)}"
  if v.per_direction is not None and len(v.per_direction) > 1:
    text += "  (per direction: " + ", ".join(f"{s:.1f}" for s in v.per_direction) + ")"
  return text


def _capability(r: result.Result) -> dict:
  return {n: r.curves[n] for n in CAPABILITY_LABELS if n in r.curves}


def _marker_lines(ax, vis_type: str) -> None:
  """θ (α=0), and θ_B (α=1) for interpolation: dotted lines named on a top axis, clear of the title."""
  marks = [(0.0, r"$\theta$" if "interpolation" not in vis_type else r"$\theta_A$")]
  if "interpolation" in vis_type:
    marks.append((1.0, r"$\theta_B$"))
  lo, hi = ax.get_xlim()
  marks = [(a, label) for a, label in marks if lo <= a <= hi]
  for a, _ in marks:
    ax.axvline(a, color="0.35", lw=1, ls=":", zorder=1)
  top = ax.secondary_xaxis("top")
  top.set_xticks([a for a, _ in marks], labels=[label for _, label in marks])
  top.tick_params(length=0, labelsize=11, labelcolor="0.25")


def _plot_1d(fig: Figure, r: result.Result) -> None:
  x, asr, bad = r.coords_x, r.asr, r.nonfinite
  coherent, capability = r.curves.get("asr_coherent"), _capability(r)
  overrefusal = r.curves.get("overrefusal")
  judges = {n: r.curves[result.JUDGE + n] for n in r.judges if result.JUDGE + n in r.curves}
  ax = fig.add_subplot()
  many = len(asr) > 1
  for k, curve in enumerate(asr):
    line, = ax.plot(x, curve, marker="o", ms=4, lw=1.4, alpha=0.85 if many else 1.0,
                    label=f"keyword ASR, direction {k}" if coherent is not None else f"direction {k}")
    if "asr" in r.ci95:
      lo, hi = r.ci95["asr"][k].T
      ax.fill_between(x, lo, hi, where=~np.isnan(lo), color=line.get_color(), alpha=0.15, lw=0,
                      label="95% interval (bootstrap over prompts)" if k == 0 else None)
    if k < len(r.refined) and r.refined[k].alpha.size:
      ax.scatter(r.refined[k].alpha, r.refined[k].curves["asr"], marker="D", s=24, facecolors="none",
                 edgecolors=line.get_color(), linewidths=1.2, zorder=5,
                 label="refined points (50 % walls bisected)" + (f" (direction {k})" if many else ""))
    for j, (name, judged) in enumerate(judges.items()):
      ax.plot(x, judged[k], color=line.get_color(), ls=JUDGE_STYLES[j % len(JUDGE_STYLES)],
              marker="s", ms=3, lw=1.2, alpha=0.75,
              label=f"{name} ASR" + (f" (direction {k})" if many else ""))
    if coherent is not None:
      ax.plot(x, coherent[k], color=line.get_color(), ls="--", marker="v", ms=4, lw=1.4,
              label=f"coherent ASR (nll_ref ≤ {r.max_nll})" + (f" (direction {k})" if many else ""))
    if overrefusal is not None:
      ax.plot(x, overrefusal[k], color=line.get_color(), ls="-.", marker="^", ms=4, lw=1.4,
              label=_overrefusal_label(r) + (f" (direction {k})" if many else ""))
  if many:
    mean = asr.mean(axis=0)   # NaN wherever a direction is missing: a partial mean would not compare
    ax.plot(x, mean, color="black", lw=3, ls="--", label="mean", zorder=4)
  elif not _partial(r) and np.nanmin(asr[0]) < 100:  # no basin to show on a flat-100 curve
    start, end = visage.basin_bounds(asr[0])
    ax.axvspan(x[start], x[end], color="tab:green", alpha=0.08, lw=0, label="safety basin (VISAGE span)")
  if bad.any():
    k, i = np.nonzero(bad)
    ax.scatter(x[i], np.where(np.isnan(asr[k, i]), 100.0, asr[k, i]), **NONFINITE_STYLE)
  ax.set_ylim(-2, 102)
  pad = 0.02 * (x.max() - x.min() or 1.0)
  ax.set_xlim(x.min() - pad, x.max() + pad)
  _marker_lines(ax, r.vis_type)
  if "interpolation" in r.vis_type:
    ax.set_xlabel(r"α (interpolation: $\theta_A \to \theta_B$)")
  else:
    ax.set_xlabel(f"α ({r.vis_type}: θ + α·d)")
  ax.set_ylabel("ASR (%)" if overrefusal is None else "ASR / over-refusal (%)")
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if capability:
    more = _capability_axis(ax, x, capability)
    handles, labels = handles + [h for h, _ in more], labels + [lab for _, lab in more]
  ax.legend(handles, labels, loc="upper left",
            bbox_to_anchor=(1.01 + 0.11 * len(capability) + 0.04 * (len(capability) > 1), 1.0),
            fontsize=8, frameon=False)
  title = _header(r) + "\n" + _visage_text(r.visages["asr"])
  if coherent is not None:
    text = _visage_text(r.visages.get("asr_coherent", result.Visage(None, None, None, None)))
    title += "\non coherent ASR: " + text.replace("VISAGE ", "")   # a line each: titles stay inside
  ax.set_title(title, fontsize=10)


def _overrefusal_label(r: result.Result) -> str:
  o = r.overrefusal
  return f"over-refusal ({o.n_prompts} safe prompts, {o.judge} judge)"


def _capability_axis(ax, x: np.ndarray, capability: dict) -> list:
  """Capability curves (mean over directions) on a second y axis: perplexity on a log scale, or
  accuracy in [0, 1] when only that was measured; [(handle, label)] for the legend."""
  twin, out = ax.twinx(), []
  for name, style in (("perplexity", "o"), ("mc_accuracy", "D")):
    if name not in capability:
      continue
    target = twin if name == "perplexity" or "perplexity" not in capability else ax.twinx()
    if target is not twin:
      target.spines["right"].set_position(("axes", 1.12))
    h, = target.plot(x, np.nanmean(capability[name], axis=0), color="0.45" if name == "perplexity" else "tab:purple",
                     marker=style, ms=3, lw=1.1, ls=":", label=CAPABILITY_LABELS[name])
    if name == "perplexity":
      target.set_yscale("log")
      target.set_ylabel("perplexity (log)", color="0.35")
    else:
      target.set_ylim(-0.02, 1.02)
      target.set_ylabel("accuracy", color="tab:purple")
    out.append((h, CAPABILITY_LABELS[name]))
  return out


def _axis_labels(vis_type: str) -> tuple[str, str]:
  if vis_type == "2D_random":
    return "α (d₁)", "β (d₂)"
  if vis_type == "2D_interpolation-random":
    return r"α (interpolation: $\theta_A \to \theta_B$)", "β (random d)"
  if vis_type == "2D_gradient-random":
    return "α (−∇ compliance loss)", "β (random d)"
  if vis_type == "2D_refusal-random":
    return "α (refusal ablation; α = 1 ablates)", "β (random d)"
  return "α (interpolation)", "β (interpolation)"


def _capability_contour(fig: Figure, ax, gx, gy, capability: dict, xlabel: str, ylabel: str) -> None:
  """Perplexity (log colour scale) or, when only it was measured, accuracy over the plane, to
  read beside the ASR contour: where ASR rises, did capability fall with it?"""
  name = "perplexity" if "perplexity" in capability else "mc_accuracy"
  values = capability[name]
  if name == "perplexity":   # orders of magnitude: its log10 on a linear colour scale
    values = np.log10(np.where(values > 0, values, np.nan))
  z = np.ma.masked_invalid(values)
  norm = colors.Normalize(0, 1) if name == "mc_accuracy" else None
  if min(z.shape) >= 2 and z.count() >= 3:
    filled = ax.contourf(gx, gy, z, levels=20, cmap="viridis_r", norm=norm)
  else:
    filled = ax.scatter(gx.ravel(), gy.ravel(), c=z.ravel(), cmap="viridis_r", norm=norm, s=80)
  label = CAPABILITY_LABELS[name]
  fig.colorbar(filled, ax=ax, label=f"log₁₀ {label}" if name == "perplexity" else label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(f"capability: {CAPABILITY_LABELS[name]}", fontsize=10)


def _plot_2d(fig: Figure, r: result.Result) -> None:
  x, y, asr, bad = r.coords_x, r.coords_y, r.asr, r.nonfinite
  capability = _capability(r)
  gx, gy = np.meshgrid(x, y, indexing="ij")   # asr[i][j] sits at (x[i], y[j])
  z = np.ma.masked_invalid(asr)
  norm = colors.Normalize(0, 100)
  xlabel, ylabel = _axis_labels(r.vis_type)

  n_panels = 3 if capability else 2
  ax = fig.add_subplot(1, n_panels, 1)
  if min(asr.shape) >= 2 and z.count() >= 3:
    levels = np.linspace(0, 100, 21)
    filled = ax.contourf(gx, gy, z, levels=levels, cmap=CMAP, norm=norm, extend="neither")
    lines = ax.contour(gx, gy, z, levels=[25, 50, 75], colors="white", linewidths=0.7, alpha=0.8)
    ax.clabel(lines, fmt="%d%%", fontsize=7)
  else:
    filled = ax.scatter(gx.ravel(), gy.ravel(), c=asr.ravel(), cmap=CMAP, norm=norm, s=80)
  if _partial(r):
    miss = np.isnan(asr)
    ax.scatter(gx[miss], gy[miss], s=6, color="0.6", clip_on=False, label="not evaluated")
  fig.colorbar(filled, ax=ax, label="ASR (%)", ticks=np.linspace(0, 100, 6))
  over = r.curves.get("overrefusal")
  if over is not None and min(over.shape) >= 2 and np.isfinite(over).sum() >= 3:
    ring = ax.contour(gx, gy, np.ma.masked_invalid(over), levels=[25, 50, 75], colors="tab:blue",
                      linewidths=1.0, linestyles="dashdot")
    ax.clabel(ring, fmt="%d%%", fontsize=7)
    ax.plot([], [], color="tab:blue", ls="-.", lw=1.0, label=_overrefusal_label(r))
  if x.min() <= 0.0 <= x.max() and y.min() <= 0.0 <= y.max():
    ax.scatter([0.0], [0.0], marker="*", s=220, color="white", edgecolors="black", zorder=6, clip_on=False,
               label="θ (center)")
  if bad.any():
    ax.scatter(gx[bad], gy[bad], **NONFINITE_STYLE)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_aspect("equal" if np.isclose(np.ptp(x), np.ptp(y)) else "auto")
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
  ax.set_title("ASR contour  ·  " + _visage_text(r.visages["asr"]), fontsize=10)

  if capability:
    _capability_contour(fig, fig.add_subplot(1, n_panels, 2), gx, gy, capability, xlabel, ylabel)
  ax3 = fig.add_subplot(1, n_panels, n_panels, projection="3d")
  if min(asr.shape) >= 2:
    ax3.plot_surface(gx, gy, z, cmap=CMAP, norm=norm, rstride=1, cstride=1, linewidth=0.2,
                     edgecolor="0.3", antialiased=True, alpha=0.95)
  else:
    ax3.plot(gx.ravel(), gy.ravel(), asr.ravel(), marker="o")
  if bad.any():
    ax3.scatter(gx[bad], gy[bad], np.where(np.isnan(asr[bad]), 100.0, asr[bad]),
                marker="x", color="red", s=40, depthshade=False)
  ax3.set_zlim(0, 100)
  ax3.set_xlabel("α")
  ax3.set_ylabel("β")
  ax3.set_zlabel("ASR (%)")
  ax3.view_init(elev=28, azim=-130)
  ax3.set_title("ASR surface  ·  " + _visage_text(r.visages["asr"], with_ci=False), fontsize=10)
  fig.suptitle(_header(r), fontsize=11)


def plot_landscape(record: result.Result, path: str) -> None:
  """Renders one run's record to a PNG; written atomically so a watcher never sees half a file."""
  if not record.two_d:
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    _plot_1d(fig, record)
  else:
    fig = Figure(figsize=(13 + 5.5 * bool(_capability(record)), 5.6), layout="constrained")
    _plot_2d(fig, record)
  _save(fig, path)


def plot_trajectory(record: result.Result, path: str) -> None:
  """A trajectory run's ASR contour on its plane with the fine-tuning path drawn from start to
  end, each checkpoint coloured by its own (true) ASR; the grid shows the surface at its projection."""
  t = record.trajectory
  x, y = record.coords_x, record.coords_y
  gx, gy = np.meshgrid(x, y, indexing="ij")
  norm = colors.Normalize(0, 100)
  fig = Figure(figsize=(7.2, 6.0), layout="constrained")
  ax = fig.add_subplot()
  z = np.ma.masked_invalid(record.asr)
  if min(z.shape) >= 2 and z.count() >= 3:
    filled = ax.contourf(gx, gy, z, levels=np.linspace(0, 100, 21), cmap=CMAP, norm=norm)
    lines = ax.contour(gx, gy, z, levels=[50], colors="white", linewidths=1.0)
    ax.clabel(lines, fmt="%d%%", fontsize=7)
  else:
    filled = ax.scatter(gx.ravel(), gy.ravel(), c=record.asr.ravel(), cmap=CMAP, norm=norm, s=80)
  fig.colorbar(filled, ax=ax, label="ASR (%)", ticks=np.linspace(0, 100, 6))
  cx, cy = t.coords[:, 0], t.coords[:, 1]
  ax.plot(cx, cy, color="black", lw=1.2, zorder=4)
  true = t.checkpoint.get("asr", np.full(len(cx), np.nan))
  ax.scatter(cx, cy, c=np.nan_to_num(true, nan=0.0), cmap=CMAP, norm=norm, s=70, edgecolors="black",
             linewidths=1.0, zorder=5, plotnonfinite=True)
  for k, (px, py) in enumerate(zip(cx, cy)):
    label = "start" if k == 0 else "end" if k == len(cx) - 1 else ""
    ax.annotate(f"{label} (step {t.steps[k]})" if label else str(t.steps[k]), (px, py),
                textcoords="offset points", xytext=(6, 6), fontsize=8 if label else 7,
                fontweight="bold" if label else "normal", color="black",
                bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0))
  ev = t.explained_variance
  ax.set_xlabel(f"α (PCA d₁, {100 * ev[0]:.0f}% of variance; 1 = {t.scale[0]:.3g})")
  ax.set_ylabel(f"β (PCA d₂, {100 * ev[1]:.0f}%; 1 = {t.scale[1]:.3g})")
  ax.set_title("fine-tuning trajectory  ·  dots: each checkpoint's own ASR", fontsize=10)
  final = (record.model or "").rstrip("/")   # FT/model says little alone: name its fine-tune folder
  name = "/".join(final.split("/")[-3:]) if os.path.basename(final) == "model" else os.path.basename(final)
  fig.suptitle(f"{name or 'unknown model'}  ·  {len(t.steps)} checkpoints  ·  "
               f"{record.n_prompts} prompts{'  [partial]' if _partial(record) else ''}", fontsize=11)
  _save(fig, path)


def plot_sweep(records: dict, path: str) -> list[str]:
  """One axes for a whole sweep (run name -> record): ASR vs alpha of every run (1D: mean over
  directions; 2D: the beta = 0 slice, dashed). Returns the runs drawn; runs with no point yet,
  or 2D ones without beta = 0, are left out. Atomic, like plot_landscape."""
  fig = Figure(figsize=(10, 5.2), layout="constrained")
  ax = fig.add_subplot()
  drawn = []
  for name, r in records.items():
    if not r.two_d:
      curve, style, label = r.asr.mean(axis=0), "-", name
    else:
      zero = np.flatnonzero(np.isclose(r.coords_y, 0.0))
      if not len(zero):
        continue
      curve, style, label = r.asr[:, zero[0]], "--", f"{name} (β = 0 slice)"
    if np.isnan(curve).all():
      continue
    partial = "  [partial]" if _partial(r) else ""
    ax.plot(r.coords_x, curve, ls=style, marker="o", ms=3, lw=1.4,
            label=f"{label}  ·  {_visage_text(r.visages['asr'], with_ci=False)}{partial}")
    drawn.append(name)
  if not drawn:
    ax.text(0.5, 0.5, "no evaluated points yet", ha="center", va="center", transform=ax.transAxes)
  ax.axvline(0.0, color="0.35", lw=1, ls=":", zorder=1)
  ax.set_ylim(-2, 102)
  ax.set_xlabel("α")
  ax.set_ylabel("ASR (%)")
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  ax.set_title(f"sweep: {len(drawn)} of {len(records)} runs", fontsize=10)
  _save(fig, path)
  return drawn


WALL_MARKERS = (("<", "α < 0"), (">", "α > 0"))   # a structured direction's wall on each side


def _wall_radii(run, k: int, measure: str) -> list[float]:
  """|α| from the origin of direction k's walls (the sides that break)."""
  sides = run.sides.get(measure)
  walls = sides.walls[k] if sides else (None, None)
  return [abs(w - run.origin) for w in walls if w is not None]


def _wall_rows(ax, rows: list, measure: str, color: dict, xmax: float) -> None:
  """One row per structured direction: its grid's reach (grey), a filled marker at |α| of each
  side's wall, a hollow one at the grid's edge where a side never breaks."""
  for i, (run, k) in enumerate(rows):
    ax.plot([0, max(run.extent)], [i, i], color="0.88", lw=4, solid_capstyle="butt", zorder=1)
    sides = run.sides.get(measure)
    if sides is None:
      ax.text(xmax / 2, i, "not measured", ha="center", va="center", fontsize=8, color="0.4", style="italic",
              bbox=dict(fc="white", ec="none", pad=1))
      continue
    unbroken = []
    for wall, (marker, side), end in zip(sides.walls[k], WALL_MARKERS, run.extent):
      if wall is None and end > 0:   # a side the grid covers that never breaks
        ax.plot(end, i, marker=marker, ms=10, mfc="white", mec=color[id(run)], mew=1.5, ls="", zorder=3)
        unbroken.append((side, end))
      elif wall is not None:
        ax.plot(abs(wall - run.origin), i, marker=marker, ms=10, color=color[id(run)], ls="", zorder=3)
    if unbroken:
      text = "no wall on this grid" + ("" if len(unbroken) == 2 else f" at {unbroken[0][0]}")
      ax.annotate(text, xy=(max(e for _, e in unbroken), i), xytext=(-4, 7), textcoords="offset points",
                  ha="right", va="bottom", fontsize=7.5, color="0.3", style="italic")
  ax.set_yticks(range(len(rows)), fontsize=8.5, labels=[
      f"{run.name}\n{run.vis_type}" + (f", direction {k}" if len(run.sides["asr"].walls) > 1 else "")
      for run, k in rows])
  ax.set_ylim(len(rows) - 0.4, -0.75)
  ax.grid(axis="x", alpha=0.3)


def _safe_fraction(ax, run, measure: str, color: str) -> None:
  """The census's share of directions safe up to each radius: a step that drops at the grid's
  radii, from the share safe at the origin itself, in its Clopper-Pearson band."""
  c = run.census.get(measure)
  if c is None:
    return
  n = c["n_directions"]
  k0 = sum(w is None or w > 0 for w in c["walls"])
  x = np.array([0.0, *c["radii"]])
  y = np.array([k0 / n, *c["safe_fraction"]])
  lo, hi = np.array([census.clopper_pearson(k0, n), *map(tuple, c["ci95"])]).T
  ax.fill_between(x, lo, hi, step="post", color=color, alpha=0.18, lw=0)
  ax.step(x, y, where="post", color=color, lw=2.2, marker="o", ms=3.5,
          label=f"{run.name}: {n} random directions, safe while ASR ≤ {c['threshold']:.1f} %")


def plot_walls(runs: list, labels: dict, path: str) -> None:
  """Where safety breaks, for reports/walls.py's RunWalls, one column per measure (labels: curve
  name -> title): above, a row per structured direction marking its wall on each side; below, each
  census's safe fraction against radius |α| with its 95 % band, the structured walls dotted across."""
  census_runs = [r for r in runs if r.census is not None]
  rows = [(r, k) for r in runs if r.sides is not None for k in range(len(r.sides["asr"].walls))]
  color = {id(r): f"C{i % 10}" for i, r in enumerate(runs)}
  xmax = max(max(r.extent) for r in runs) or 1.0
  heights = ([0.5 * len(rows) + 0.5] if rows else []) + ([3.4] if census_runs else [])
  fig = Figure(figsize=(2.2 + 5.4 * len(labels), sum(heights) + 1.9), layout="constrained")
  grid = fig.add_gridspec(len(heights), len(labels), height_ratios=heights)
  for j, (measure, title) in enumerate(labels.items()):
    axes = [fig.add_subplot(grid[i, j]) for i in range(len(heights))]
    if rows:
      _wall_rows(axes[0], rows, measure, color, xmax)
    if census_runs:
      ax = axes[-1]
      for run in census_runs:
        _safe_fraction(ax, run, measure, color[id(run)])
      for run, k in rows:
        for r in _wall_radii(run, k, measure):
          ax.axvline(r, color=color[id(run)], ls=":", lw=1.3, zorder=1)
      ax.set_ylim(-0.02, 1.04)
      ax.grid(alpha=0.3)
      if j == 0:
        ax.set_ylabel("fraction of directions\nsafe up to radius |α|")
      if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    for ax in axes:
      ax.set_xlim(-0.02 * xmax, 1.04 * xmax)
      ax.tick_params(labelbottom=ax is axes[-1], labelleft=j == 0)
    axes[0].set_title(title if title == measure else f"{title} ({measure})", fontsize=10)
    axes[-1].set_xlabel("radius |α| from the origin θ")
  handles = []
  if rows:
    handles += [Line2D([], [], marker=m, ls="", color="0.25", ms=8,
                       label=f"wall at {side}: first point over the threshold") for m, side in WALL_MARKERS]
    handles.append(Line2D([], [], marker=">", ls="", mfc="white", mec="0.25", ms=8,
                          label="no wall on this grid (drawn at the grid's edge)"))
  if census_runs:
    handles.append(Patch(color="0.5", alpha=0.35, lw=0, label="95 % Clopper-Pearson interval over directions"))
  if census_runs and rows:
    handles.append(Line2D([], [], ls=":", color="0.25", label="a structured wall, carried onto the census"))
  fig.legend(handles=handles, loc="outside lower center", ncol=2 if census_runs and rows else 1,
             fontsize=8.5, frameon=False)
  fig.suptitle("Where safety breaks: a point is safe while its ASR is at or under the run's threshold "
               "(the ASR at θ plus a tolerance, or census.max_asr)", fontsize=11)
  _save(fig, path)

def plot_curves(series, path: str, title: str, xlabel: str) -> str:
  """ASR curves on one axes, series = [(label, xs, asr), ...] (the experiments' F1-F4 figures)."""
  fig = Figure(figsize=(8, 4.6), layout="constrained")
  ax = fig.add_subplot()
  for label, xs, ys in series:
    ax.plot(xs, ys, marker="o", ms=3, label=label)
  ax.set_ylim(-3, 103)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("ASR (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=10)
  _save(fig, path, dpi=110)
  return path


def plot_capability(alphas, perplexity, asr, path: str) -> str:
  """ASR and perplexity along one direction, on twin axes (the paper's Figs. 7-8)."""
  fig = Figure(figsize=(8, 4.6), layout="constrained")
  ax = fig.add_subplot()
  ax.plot(alphas, asr, marker="o", color="tab:red", label="ASR (%) on AdvBench")
  ax.set_ylim(-3, 103)
  ax.set_xlabel("α (F1 direction 0)")
  ax.set_ylabel("ASR (%)", color="tab:red")
  ax2 = ax.twinx()
  ax2.plot(alphas, perplexity, marker="s", color="tab:blue", label="perplexity of own α=0 benign answers")
  ax2.set_yscale("log")
  ax2.set_ylabel("perplexity (log)", color="tab:blue")
  fig.legend(loc="upper center", fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path, dpi=110)
  return path


def plot_loss(steps, losses, path: str) -> None:
  """A fine-tuning run's loss per step."""
  fig = Figure(figsize=(6, 3.5), layout="tight")
  ax = fig.add_subplot()
  ax.plot(steps, losses, lw=1)
  ax.set(xlabel="step", ylabel="loss (response tokens)", title="fine-tuning loss")
  ax.grid(alpha=0.3)
  _save(fig, path, dpi=120)


def _save(fig: Figure, path: str, dpi: int = DPI) -> None:
  FigureCanvasAgg(fig)
  with rundir.atomic(path) as tmp:
    fig.savefig(tmp, format="png", dpi=dpi)
