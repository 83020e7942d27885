"""The figures of the paper's studies, as PNG files next to the tables.

- trend.png: a metric against the noise ratio, one line per method (mean
  over categories, error bars the std over the repeats), one panel per
  other setting, the protocol named 'overlap' / 'no overlap': the trend
  figures of SoftPatch (Jiang et al., NeurIPS 2022).
- embedding.png: a t-SNE (scikit-learn; a PCA in numpy without it) of
  training patches of one noisy cell, one panel per method: its memory bank
  coloured by origin (clean or injected training image) and the patches its
  discriminator removed as outliers (the paper's coreset figure).
- weights.png: histograms of the discriminator weights of the patches of
  injected against clean training images, with the outlier threshold.

matplotlib and scikit-learn come with the `viz` extra. Without matplotlib
the runner writes its tables, logs one line, and skips the figures (and the
extra fit they need). Drawing uses matplotlib's object API (no pyplot), so
importing this module never changes a user's plotting backend.
"""

from __future__ import annotations

import io
import os
import textwrap
from typing import Dict, List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from softpatch_jax import banks
from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import io_utils
from softpatch_jax import methods as methods_lib
from softpatch_jax import studies
from softpatch_jax import study_tables

try:
  from matplotlib.figure import Figure
except ImportError:  # the `viz` extra is not installed
  Figure = None
try:
  from sklearn import manifold
  import threadpoolctl  # a dependency of scikit-learn
except ImportError:
  manifold = threadpoolctl = None

DIAGNOSIS = "diagnosis.npz"
# Patches drawn for the embedding: random ones, and per method (the first
# _N_EMBEDDED) bank entries and removed patches; t-SNE time grows with them.
_N_RANDOM, _N_BANK, _N_REMOVED, _N_EMBEDDED = 400, 200, 150, 3


def available() -> bool:
  return Figure is not None


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  io_utils.write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------
# Diagnosis of one cell: banks, outlier flags and weights of its methods.


def diagnosis_cell(cells: Sequence, study) -> Optional[int]:
  """The cell whose banks the embedding and histograms show, or None.

  study.diagnose 'auto' picks the first cell with the largest noise ratio
  (none when that is 0); '' or 'none' turns it off, as does a missing
  matplotlib.
  """
  choice = str(study.get("diagnose", "auto") or "none")
  if choice == "none" or not available() or not study.get("figures", True):
    return None
  ratios = [float(c.config.noise.ratio) for c in cells]
  if not ratios or max(ratios) <= 0:
    return None
  return cells[int(np.argmax(ratios))].index


def _diagnosed(names: Sequence[str]) -> List[str]:
  """PatchCore and the denoising methods of `names` (memory-bank methods)."""
  out = []
  for m in names:
    method = methods_lib.METHODS.get(m) if m in methods_lib.METHODS else None
    if method is not None and (method.denoises or m == "patchcore"):
      out.append(m)
  return out


def diagnosis_key(path: str) -> Optional[str]:
  """The key `save_diagnosis` stored in `path` (None: no readable file)."""
  try:
    with np.load(path) as f:
      return str(f["key"])
  except (OSError, KeyError, ValueError):
    return None


def save_diagnosis(path, opts, train, embedder, pre, key="") -> None:
  """Refits the cell's bank methods and saves what the figures need.

  `opts`: the cell's `options.RunOptions`. `key` (the cell and its
  configuration) is stored with the data, so a later run can tell whether
  the file is still that of its cell.
  """
  names = _diagnosed(opts.method_names)
  if not names:
    return
  feats = embedding.extract_features(
      embedder, train, pre, opts.loader(), desc="diagnosis: train features"
  )
  n, p, d = feats.shape
  image_size = pre.input_size or (pre.crop, pre.crop)
  bank_opts = opts.bank_options()
  geometry = methods_lib.BankGeometry(embedder.grid(image_size), image_size)
  prng = jax.random.PRNGKey(opts.seed)  # the key of fitting.fit_methods
  rng = np.random.default_rng(0)
  picks = [rng.choice(n * p, min(_N_RANDOM, n * p), replace=False)]
  out = {
      "injected": np.array([bool(getattr(s, "injected", False)) for s in train])
  }
  # The paper's figure: PatchCore against SoftPatch (LOF first).
  embedded = [m for m in ("patchcore", "softpatch_lof") if m in names]
  embedded += [m for m in names if m not in embedded][
      : _N_EMBEDDED - len(embedded)
  ]
  for m in names:
    _, fit = banks.build_bank(feats, prng, m, bank_opts, geometry)
    bank = np.asarray(coreset.compact((fit.indices, fit.valid)))
    out[f"bank/{m}"] = bank
    removed = np.zeros((0,), np.int64)
    if fit.weights is not None:
      out[f"weights/{m}"] = np.asarray(fit.weights)
      out[f"threshold/{m}"] = np.asarray(fit.threshold)
      removed = np.flatnonzero(np.asarray(fit.outliers).reshape(-1))
    if m in embedded:
      picks.append(rng.choice(bank, min(_N_BANK, bank.size), replace=False))
      picks.append(
          rng.choice(removed, min(_N_REMOVED, removed.size), replace=False)
      )
  sample = np.unique(np.concatenate(picks))
  out["sample"] = sample
  out["feats"] = feats.reshape(n * p, d)[sample].astype(np.float32)
  out["names"] = np.array(names)
  out["embedded"] = np.array(embedded)
  out["patches_per_image"] = np.array(p)
  out["key"] = np.array(key)
  buf = io.BytesIO()
  np.savez_compressed(buf, **out)
  io_utils.write_bytes(path, buf.getvalue())


def embed_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
  """(n, D) -> (n, 2): t-SNE after a 50-d PCA, or the 2-d PCA alone."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  pcs = u * s  # principal component scores, largest first
  if manifold is None or len(x) < 10:
    return pcs[:, :2]
  tsne = manifold.TSNE(
      n_components=2,
      init="pca",
      random_state=seed,
      perplexity=min(30.0, (len(x) - 1) / 3.0),
  )
  # One OpenMP thread: on a busy machine more threads spin against each
  # other (30x slower measured on 2 shared cores) for little gain otherwise.
  with threadpoolctl.threadpool_limits(1):
    return tsne.fit_transform(pcs[:, :50])


def _grid(n: int, width: float = 4.2, height: float = 3.6):
  cols = min(n, 3)
  rows = (n + cols - 1) // cols
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes


def plot_embedding(path: str, diag: Dict[str, np.ndarray]) -> None:
  names = [str(m) for m in diag.get("embedded", diag["names"])]
  sample, p = diag["sample"], int(diag["patches_per_image"])
  xy = embed_2d(diag["feats"])
  from_injected = diag["injected"][sample // p]
  fig, axes = _grid(len(names))
  how = "t-SNE" if manifold is not None else "PCA"
  for ax, m in zip(axes, names):
    ax.scatter(*xy.T, s=2, c="0.85", label="training patches")
    if f"weights/{m}" in diag:  # under the bank entries, which it excludes
      outlier = diag[f"weights/{m}"].reshape(-1) > diag[f"threshold/{m}"]
      ax.scatter(
          *xy[outlier[sample]].T,
          s=6,
          c="tab:red",
          marker="x",
          linewidths=0.6,
          alpha=0.5,
          label="removed as outliers",
      )
    in_bank = np.isin(sample, diag[f"bank/{m}"])
    for sel, colour, name in [
        (in_bank & ~from_injected, "tab:blue", "bank: clean image"),
        (in_bank & from_injected, "tab:orange", "bank: injected image"),
    ]:
      ax.scatter(*xy[sel].T, s=5, c=colour, label=name)
    bank = diag[f"bank/{m}"]
    n_inj = int(diag["injected"][bank // p].sum())
    ax.set_title(
        f"{studies.label(m)}\n{n_inj} of {bank.size} bank entries from "
        "injected images",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
  # The last panel's legend names every marker (the first may be PatchCore's).
  axes[len(names) - 1].legend(loc="best", fontsize=7, markerscale=2)
  fig.suptitle(f"{how} of training patches: memory banks and removed outliers")
  _save(fig, path)


def plot_weights(path: str, diag: Dict[str, np.ndarray]) -> None:
  names = [str(m) for m in diag["names"] if f"weights/{m}" in diag]
  if not names:
    return
  injected = diag["injected"]
  fig, axes = _grid(len(names))
  for ax, m in zip(axes, names):
    w = diag[f"weights/{m}"]
    bins = np.histogram_bin_edges(w, 60)
    ax.hist(w[~injected].ravel(), bins, density=True, alpha=0.6, label="clean")
    if injected.any():
      ax.hist(
          w[injected].ravel(), bins, density=True, alpha=0.6, label="injected"
      )
    ax.axvline(float(diag[f"threshold/{m}"]), c="k", ls="--", label="threshold")
    ax.set_yscale("log")
    ax.set_title(f"{studies.label(m)} patch weights")
    ax.set_xlabel("weight (larger = more likely an outlier)")
  axes[0].legend(fontsize=7)
  _save(fig, path)


# --------------------------------------------------------------------------
# The trend figure.


def _trend_panel(a, x_axis: str):
  """(metric, the other axes its title names) of an aggregate row, or None
  for a no-overlap cell's '_excl_injected' entry (the plain metric there)."""
  rest = tuple((k, v) for k, v in a["setting"] if k != x_axis)
  pairs = study_tables.metric_settings(a["metric"], [(a["setting"], rest)])
  return (a["metric"], pairs[0][1]) if pairs else None


def plot_trend(path, agg, methods, metrics, x_axis="noise.ratio") -> bool:
  """Each metric's 'mean' category against `x_axis`: a panel per metric and
  other setting, a line per method. False (nothing written) when there is
  no trend: fewer than two values of `x_axis`.

  `methods`: names, or {name: legend label}. Panels name the protocol
  'overlap' / 'no overlap'; an '_excl_injected' metric is drawn for the
  overlap cells only, titled as their no-overlap result.
  """
  if isinstance(metrics, str):
    metrics = [metrics]
  if not isinstance(methods, dict):
    methods = {m: studies.label(m) for m in methods}
  rows = [
      a
      for a in agg
      if a["category"] == "mean"
      and a["metric"] in metrics
      and x_axis in dict(a["setting"])
      and _trend_panel(a, x_axis) is not None
  ]
  if len({dict(a["setting"])[x_axis] for a in rows}) < 2:
    return False
  panels = list(dict.fromkeys(_trend_panel(a, x_axis) for a in rows))
  fig, axes = _grid(len(panels), 4.8, 3.8)
  for ax, panel in zip(axes, panels):
    metric, rest = panel
    for m, name in methods.items():
      pts = sorted(
          (float(dict(a["setting"])[x_axis]), a["mean"], a["std"])
          for a in rows
          if a["method"] == m and _trend_panel(a, x_axis) == panel
      )
      if pts:
        x, y, e = map(np.array, zip(*pts))
        ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=name)
    ax.set_xlabel(x_axis)
    ax.set_ylabel(metric)
    title = textwrap.fill(study_tables.METRIC_TITLES.get(metric, metric), 48)
    if rest:
      title += "\n" + study_tables.setting_label(rest)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  _save(fig, path)
  return True


def write_all(workdir: str, study, agg, methods) -> List[str]:
  """Writes every figure the results allow; returns the paths written.

  `methods`: names, or {name: legend label} (`plot_trend`).
  """
  if not study.get("figures", True):
    return []
  if not available():
    logging.info(
        "matplotlib is not installed (pip install -e '.[viz]'): tables "
        "written, figures skipped"
    )
    return []
  written = []
  # Timings have no trend worth a figure.
  metrics = [
      m.strip()
      for m in str(study.get("metrics", "image_auroc")).split(",")
      if m.strip() and not m.strip().endswith("_s")
  ]
  path = os.path.join(workdir, "trend.png")
  if metrics and plot_trend(path, agg, methods, metrics):
    written.append(path)
  diag_path = os.path.join(workdir, DIAGNOSIS)
  if os.path.exists(diag_path):
    with np.load(diag_path) as f:
      diag = {k: f[k] for k in f.files}
    for name, fn in [
        ("embedding.png", plot_embedding),
        ("weights.png", plot_weights),
    ]:
      out = os.path.join(workdir, name)
      # Redrawn only when the diagnosis is newer (t-SNE takes a while).
      if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(
          diag_path
      ):
        fn(out, diag)
      if os.path.exists(out):
        written.append(out)
  return written
