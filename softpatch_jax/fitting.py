"""Fitting memory banks over a training set: embed once, fit every method.

Below the edge: it takes typed records (`BankOptions`,
`embedding.LoaderOptions`) and plain values, reads images through
`embedding`, logs progress lines and writes no files. `fit_bank` is
`banks.build_bank` timed and summarised (`FitInfo`); `fit_methods` embeds
the training samples once and fits every method on them; `heldout_scores`
scores each training image with a bank that never saw it (for quantile
thresholds).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from softpatch_jax import banks
from softpatch_jax import consensus
from softpatch_jax import coreset
from softpatch_jax import data
from softpatch_jax import embedding
from softpatch_jax import methods as methods_lib
from softpatch_jax import scoring

# The settings of a fit (discriminator, coreset, scoring): `methods`'.
BankOptions = methods_lib.BankOptions


@dataclasses.dataclass
class FitInfo:
  """What fitting did, for the results files and for diagnosis."""

  method: str
  n_images: int
  n_patches: int
  bank_size: int
  n_outlier_patches: int = 0
  outlier_threshold: Optional[float] = None
  # (N,) fraction of each training image's patches flagged as outliers.
  image_outlier_fraction: Optional[np.ndarray] = None
  # (N, P) outlier weights; kept for analysis, not saved in the bank.
  weights: Optional[np.ndarray] = None
  # (bank_size,) the training image each bank entry came from.
  bank_images: Optional[np.ndarray] = None
  fit_s: float = 0.0
  train_images: Optional[np.ndarray] = None  # those kept by an image filter


def _summary(method, n: int, p: int, bank, fit) -> FitInfo:
  info = FitInfo(
      method=method.name, n_images=n, n_patches=n * p, bank_size=bank.size
  )
  info.bank_images = np.asarray(coreset.compact((fit.indices, fit.valid))) // p
  if fit.outliers is not None:
    info.outlier_threshold = float(fit.threshold)
    info.n_outlier_patches = int(fit.outliers.sum())
    info.image_outlier_fraction = np.asarray(fit.outliers.mean(axis=1))
    info.weights = np.asarray(fit.weights)
  return info


def fit_bank(
    train_feats,
    method,
    key,
    options: BankOptions,
    geometry: methods_lib.BankGeometry,
    *,
    mesh=None,
    label: str = "fit",
):
  """`banks.build_bank` on concrete features, timed and summarised.

  Logs what it is about to do and when the discriminator weights are done
  (each stage can take minutes); `label` prefixes those lines. Returns
  (MemoryBank, FitInfo).
  """
  t0 = time.perf_counter()
  method = methods_lib.get_method(method)
  n, p = np.shape(train_feats)[:2]
  what = methods_lib.describe_fit(method, n, p, options.coreset)
  logging.info("%s: %s: %s ...", label, method.name, what)

  def progress(stage):
    dt = time.perf_counter() - t0
    logging.info("%s: %s: %s done in %.1fs", label, method.name, stage, dt)

  bank, fit = banks.build_bank(
      train_feats,
      key,
      method,
      options,
      geometry,
      progress=progress,
      mesh=mesh,
  )
  jax.block_until_ready(bank.features)
  info = _summary(method, n, p, bank, fit)
  info.fit_s = time.perf_counter() - t0
  return bank, info


@dataclasses.dataclass
class Fitted:
  """Banks fitted on one training set, with the features they came from."""

  banks: Dict[str, scoring.MemoryBank]
  infos: Dict[str, FitInfo]
  train_feats: np.ndarray
  grid: tuple
  image_size: tuple
  extract_s: float


def fit_methods(
    train: Sequence,
    embedder: embedding.Embedder,
    pre: data.Preprocess,
    names: Sequence[str],
    options: BankOptions,
    *,
    seed: int,
    loader: embedding.LoaderOptions,
    label: str = "fit",
) -> Fitted:
  """Embeds the training samples once and fits every method on them.

  `seed` makes the fits' PRNG key; `label` (a category name) prefixes the
  progress bar and the log lines; unreadable images as `loader.errors`
  says. The banks are fitted on the embedder's mesh, if any.
  """
  desc = f"{label}: train features"
  image_size = pre.input_size or (pre.crop, pre.crop)
  geometry = methods_lib.BankGeometry(embedder.grid(image_size), image_size)
  t0 = time.perf_counter()
  train_feats = embedding.extract_features(
      embedder,
      train,
      pre,
      loader,
      desc=desc,
      what="training image",
  )
  extract_s = time.perf_counter() - t0
  logging.info("%s %s (%.1fs)", desc, train_feats.shape, extract_s)
  key = jax.random.PRNGKey(seed)
  fitted, infos = {}, {}
  for name in names:
    fitted[name], info = fit_bank(
        train_feats,
        name,
        key,
        options,
        geometry,
        mesh=embedder.mesh,
        label=label,
    )
    infos[name] = info
    logging.info(
        "%s / %s: bank %d of %d patches, %d outlier patches (%.1fs)",
        label,
        name,
        info.bank_size,
        info.n_patches,
        info.n_outlier_patches,
        info.fit_s,
    )
  return Fitted(
      fitted, infos, train_feats, geometry.grid, tuple(image_size), extract_s
  )


def fit_consensus(
    fitted: Fitted,
    names: Sequence[str],
    subsets,
    options: consensus.ConsensusOptions,
    blur_sigma: float,
):
  """The consensus methods among `names` on `fitted.train_feats` (on a
  filtered method's rows `subsets[name]`) -> ({name: scorer}, {name:
  FitInfo})."""
  scorers, infos = {}, {}
  n_all, p = fitted.train_feats.shape[:2]
  for name in names:
    if methods_lib.family(name) != methods_lib.CONSENSUS:
      continue
    t0 = time.perf_counter()
    rows = subsets.get(name)
    feats = fitted.train_feats if rows is None else fitted.train_feats[rows]
    model = consensus.fit(
        feats, options, fitted.grid, fitted.image_size, blur_sigma
    )
    scorers[name] = consensus.ConsensusScorer(model)
    n = model.n_images
    infos[name] = FitInfo(name, n, n * p, n * p, bank_images=None)
    infos[name].fit_s = time.perf_counter() - t0
    if rows is not None:
      infos[name].train_images = np.asarray(rows)
    logging.info("%s: every patch of %d of %d images", name, n, n_all)
  return scorers, infos


def image_outlier_summary(
    info: FitInfo, injected: np.ndarray
) -> Dict[str, Optional[float]]:
  """How much of the injected vs the clean training images was flagged as
  outlier patches."""
  if info.image_outlier_fraction is None or not injected.any():
    return {}
  frac = info.image_outlier_fraction
  return {
      "outlier_frac_injected": float(frac[injected].mean()),
      "outlier_frac_clean": (
          float(frac[~injected].mean()) if (~injected).any() else None
      ),
  }


def heldout_scores(
    train_feats,
    method,
    key,
    options: BankOptions,
    geometry: methods_lib.BankGeometry,
    folds: List[np.ndarray],
    *,
    batch_size: int = 16,
):
  """Held-out image scores and pixel-map maxima of every training image.

  Fold f is scored against a bank fitted (same method and settings, key
  folded with f) on the other folds, with the search `scoring.choose_search`
  picks under `options.scoring`'s memory budget.
  """
  n = train_feats.shape[0]
  img = np.zeros((n,), np.float32)
  pix = np.zeros((n,), np.float32)
  for f, held in enumerate(folds):
    rest = np.setdiff1d(np.arange(n), held)
    fold_key = jax.random.fold_in(key, f + 1)
    bank, _ = fit_bank(train_feats[rest], method, fold_key, options, geometry)
    search = scoring.choose_search(bank, options.scoring)
    for s in range(0, held.size, batch_size):
      part = held[s : s + batch_size]
      i, maps, _ = scoring.score(bank, train_feats[part], search)
      img[part] = np.asarray(i)
      pix[part] = np.asarray(maps).reshape(part.size, -1).max(-1)
    logging.info(
        "threshold fold %d/%d: %d held out, bank %d",
        f + 1,
        len(folds),
        held.size,
        bank.size,
    )
  return img, pix
