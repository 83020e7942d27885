"""softpatch_jax.metrics vs sklearn and a slow per-threshold AUPRO reference."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as sk_metrics

from softpatch_jax import metrics


def _labels_scores(seed, n, ties):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  y[0], y[1] = 0, 1
  s = rng.standard_normal(n) + 0.8 * y
  if ties:
    s = np.round(s, 1)  # many ties, also across classes
  return y, s.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "n,ties", [(10, False), (200, True), (57, True), (3, False)]
)
def test_auroc_matches_sklearn(seed, n, ties):
  y, s = _labels_scores(seed, n, ties)
  assert metrics.image_auroc(y, s) == pytest.approx(
      sk_metrics.roc_auc_score(y, s), abs=1e-12
  )
  m = y.reshape(1, 1, -1).astype(np.float32)
  assert metrics.pixel_auroc(m, s.reshape(m.shape)) == pytest.approx(
      sk_metrics.roc_auc_score(y, s), abs=1e-12
  )


def test_auroc_constant_scores_and_bool_labels():
  y = np.array([True, False, True, False])
  assert metrics.image_auroc(y, np.ones(4)) == pytest.approx(0.5)
  assert metrics.image_auroc(y, [4.0, 1.0, 3.0, 2.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,ties", [(12, False), (150, True), (40, True)])
def test_f1_max_matches_sklearn(seed, n, ties):
  y, s = _labels_scores(seed, n, ties)
  p, r, t = sk_metrics.precision_recall_curve(y, s)
  f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) != 0)
  best = int(np.argmax(f1[:-1]))
  got_f1, got_t = metrics.f1_max_threshold(y, s)
  assert got_f1 == pytest.approx(f1[best], abs=1e-12)
  assert got_t == pytest.approx(float(t[best]))
  assert metrics.f1_max(y, s) == got_f1
  # The whole curve: sklearn's thresholds ascend, ours descend.
  thr, curve = metrics.f1_curve(y, s)
  np.testing.assert_array_equal(thr, t[::-1])
  np.testing.assert_allclose(curve, f1[:-1][::-1], rtol=0, atol=1e-12)


def test_metric_errors():
  with pytest.raises(ValueError, match="one class"):
    metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="one class"):
    metrics.pixel_auroc(np.zeros((2, 3, 3)), np.random.rand(2, 3, 3))
  with pytest.raises(ValueError, match="binary"):
    metrics.image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="non-finite"):
    metrics.image_auroc([0, 1], [0.1, np.nan])
  with pytest.raises(ValueError, match="labels but"):
    metrics.f1_max([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="shape"):
    metrics.pixel_auroc(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="no defect"):
    metrics.aupro(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))
  with pytest.raises(ValueError, match="no normal"):
    metrics.aupro(np.ones((1, 4, 4)), np.random.rand(1, 4, 4))
  with pytest.raises(ValueError, match="fpr_limit"):
    metrics.aupro(np.eye(4)[None], np.random.rand(1, 4, 4), fpr_limit=0.0)


def _slow_aupro(masks, maps, limit):
  """Loop over every distinct threshold, label regions, compute PRO and FPR."""
  fprs, pros = [0.0], [0.0]
  normal = masks == 0
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    overlaps = []
    for i in range(len(masks)):
      lab, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
      for r in range(1, k + 1):
        reg = lab == r
        overlaps.append(pred[i][reg].sum() / reg.sum())
    pros.append(np.mean(overlaps))
    fprs.append((pred & normal).sum() / normal.sum())
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= limit
  x, y = fprs[keep], pros[keep]
  if x[-1] < limit:
    j = np.flatnonzero(~keep)[0]
    y_lim = np.interp(limit, fprs[j - 1 : j + 1], pros[j - 1 : j + 1])
    x, y = np.r_[x, limit], np.r_[y, y_lim]
  return np.trapezoid(y, x) / limit


def _random_masks(seed, n, h, w, ties):
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, h, w), np.float32)
  for i in range(n):
    for _ in range(rng.integers(0, 3)):  # some images have no defect at all
      y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
      masks[i, y0 : y0 + rng.integers(1, 4), x0 : x0 + rng.integers(1, 5)] = 1
  masks[0, -1, -1] = masks[0, -2, -2] = (
      1  # diagonal neighbours: one region with 8-conn.
  )
  maps = rng.random((n, h, w)) + 0.5 * ndimage.uniform_filter(
      masks, size=(1, 3, 3)
  )
  if ties:
    maps = np.round(maps, 1)
  return masks, maps.astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "limit,ties", [(0.3, False), (0.3, True), (1.0, True), (0.05, False)]
)
def test_aupro_matches_slow_reference(seed, limit, ties):
  masks, maps = _random_masks(seed, 3, 9, 11, ties)
  got = metrics.aupro(masks, maps, fpr_limit=limit)
  assert got == pytest.approx(_slow_aupro(masks, maps, limit), abs=1e-10)
  assert 0.0 <= got <= 1.0


def test_aupro_perfect_and_worst():
  masks, _ = _random_masks(5, 2, 8, 8, False)
  assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
  assert metrics.aupro(masks, 1.0 - masks) == pytest.approx(0.0)
  # Random maps: PRO ~ FPR, so the normalised area to 0.3 is ~0.15 (never > 1).
  rng = np.random.default_rng(0)
  m = np.zeros((4, 32, 32))
  m[:, 8:20, 8:20] = 1
  assert metrics.aupro(m, rng.random(m.shape)) == pytest.approx(0.15, abs=0.03)


def test_aupro_eight_connectivity():
  # Two diagonal pixels are one region (8-conn): detecting one gives PRO 0.5.
  masks = np.zeros((1, 4, 4))
  masks[0, 0, 0] = masks[0, 1, 1] = 1
  fpr, pro = metrics.pro_curve(
      masks, np.where(np.arange(16).reshape(1, 4, 4) == 0, 1.0, 0.0)
  )
  assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0
