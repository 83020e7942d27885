"""The per-category explaining fields and files, against sklearn."""

import csv
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from softpatch_jax import data
from softpatch_jax import fitting
from softpatch_jax import inference
from softpatch_jax import reports


def _case(seed):
  """Random test/train lists, predictions and a fit record."""
  rng = np.random.default_rng(seed)
  n_good, n_bad = int(rng.integers(4, 9)), int(rng.integers(6, 12))
  types = ["crack", "hole", "scratch"]
  test = [data.Sample(f"t/good/{i}.png", 0, "good") for i in range(n_good)]
  test += [
      data.Sample(f"t/{types[i % 3]}/{i}.png", 1, types[i % 3], "m.png")
      for i in range(n_bad)
  ]
  train = [data.Sample(f"tr/{i}.png", 0, "good") for i in range(10)]
  drawn = rng.choice(np.arange(n_good, n_good + n_bad), 3, replace=False)
  train += [
      data.Sample(test[i].path, 1, test[i].defect_type, test[i].mask_path, True)
      for i in drawn
  ]
  n = len(test)
  labels = np.array([s.label for s in test])
  masks = np.zeros((n, 4, 4), np.float32)
  masks[labels == 1, 1:3, 1:3] = 1.0
  pred = inference.Predictions(
      image_scores=rng.normal(size=n).astype(np.float32) + labels,
      maps=rng.normal(size=(n, 4, 4)).astype(np.float32) + masks,
      labels=labels,
      masks=masks,
      indices=np.arange(n),
  )
  bank_images = rng.integers(0, len(train), size=40)
  info = fitting.FitInfo(
      method="softpatch_lof",
      n_images=len(train),
      n_patches=16 * len(train),
      bank_size=40,
      image_outlier_fraction=rng.uniform(size=len(train)),
      bank_images=bank_images,
  )
  return test, train, pred, info, set(int(i) for i in drawn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_method_fields_match_sklearn(seed):
  test, train, pred, info, drawn = _case(seed)
  out = reports.method_fields(pred, info, train, test, pixel_metrics=True)
  injected = np.array([s.injected for s in train])
  assert out["bank_from_injected"] == int(injected[info.bank_images].sum())
  assert out["bank_from_injected"] + out["bank_from_clean"] == 40
  keep = np.array([i not in drawn for i in range(len(test))])
  want = skm.roc_auc_score(pred.labels[keep], pred.image_scores[keep])
  assert out["image_auroc_excl_injected"] == pytest.approx(want, abs=1e-6)
  want_px = skm.roc_auc_score(pred.masks[keep].ravel(), pred.maps[keep].ravel())
  assert out["pixel_auroc_excl_injected"] == pytest.approx(want_px, abs=1e-6)
  types = np.array([s.defect_type for s in test])
  assert sorted(out["image_auroc_by_defect"]) == sorted(
      set(types[pred.labels == 1])
  )
  for t, v in out["image_auroc_by_defect"].items():
    sel = (pred.labels == 0) | (types == t)
    assert v == pytest.approx(
        skm.roc_auc_score(pred.labels[sel], pred.image_scores[sel]), abs=1e-6
    )


def test_excluding_injected_changes_nothing_without_injection():
  test, train, pred, info, _ = _case(3)
  clean = [s for s in train if not s.injected]
  info.bank_images = info.bank_images % len(clean)
  out = reports.method_fields(pred, info, clean, test, pixel_metrics=True)
  full = inference.evaluate(pred)
  assert out["image_auroc_excl_injected"] == full["image_auroc"]
  assert out["pixel_auroc_excl_injected"] == full["pixel_auroc"]


def test_category_files(tmp_path):
  test, train, pred, info, drawn = _case(4)
  # A second method scoring a permutation of the images: rows follow the
  # test list, not the prediction order.
  order = np.random.default_rng(0).permutation(len(test))
  other = inference.Predictions(
      image_scores=-pred.image_scores[order],
      maps=None,
      labels=pred.labels[order],
      masks=None,
      indices=order,
  )
  preds = {"softpatch_lof": pred, "patchcore": other}
  infos = {"softpatch_lof": info}
  reports.write_category(str(tmp_path), "c", test, train, preds, infos)
  with open(tmp_path / "scores" / "c.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["path"] for r in rows] == [s.path for s in test]
  for i, r in enumerate(rows):
    assert float(r["score_softpatch_lof"]) == pytest.approx(
        float(pred.image_scores[i]), rel=1e-5
    )
    assert float(r["score_patchcore"]) == pytest.approx(
        -float(pred.image_scores[i]), rel=1e-5
    )
    assert r["injected_into_train"] == str(i in drawn)
  with open(tmp_path / "train" / "c.csv") as f:
    rows = list(csv.DictReader(f))
  counts = np.bincount(info.bank_images, minlength=len(train))
  assert [int(r["bank_entries_softpatch_lof"]) for r in rows] == list(counts)
  assert [r["injected"] == "True" for r in rows] == [s.injected for s in train]
  assert not [n for n in os.listdir(tmp_path / "scores") if n.endswith(".tmp")]
