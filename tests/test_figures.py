"""softpatch_jax.figures: the 2-D embedding against sklearn's PCA, the PNGs
from small generated inputs, and the fallbacks without matplotlib."""

import logging

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn import decomposition

from softpatch_jax import defaults
from softpatch_jax import figures
from softpatch_jax import studies


@pytest.mark.parametrize("seed,n,d", [(0, 30, 5), (1, 8, 12), (2, 50, 3)])
def test_pca_fallback_matches_sklearn(monkeypatch, seed, n, d):
  monkeypatch.setattr(figures, "manifold", None)
  x = np.random.default_rng(seed).standard_normal((n, d)) * np.arange(1, d + 1)
  got = figures.embed_2d(x)
  ref = decomposition.PCA(2).fit_transform(x)
  # Components are defined up to their sign.
  np.testing.assert_allclose(np.abs(got), np.abs(ref), rtol=1e-6, atol=1e-8)


def test_tsne_embedding():
  x = np.random.default_rng(0).standard_normal((40, 6))
  x[:20] += 8.0  # two clusters stay apart
  got = figures.embed_2d(x)
  assert got.shape == (40, 2) and np.isfinite(got).all()
  np.testing.assert_array_equal(got, figures.embed_2d(x))  # seeded
  a, b = got[:20].mean(0), got[20:].mean(0)
  spread = max(got[:20].std(0).max(), got[20:].std(0).max())
  assert np.linalg.norm(a - b) > 2 * spread


def _diag(seed=0, n=6, p=9, d=5):
  rng = np.random.default_rng(seed)
  injected = np.zeros(n, bool)
  injected[-2:] = True
  w = rng.uniform(1, 2, (n, p)).astype(np.float32)
  w[injected] += 1.0
  bank = np.array([0, 5, 11, 40, 52])
  sample = np.arange(n * p)
  return {
      "injected": injected,
      "names": np.array(["patchcore", "softpatch_lof"]),
      "bank/patchcore": bank,
      "bank/softpatch_lof": bank[:3],
      "weights/softpatch_lof": w,
      "threshold/softpatch_lof": np.float32(np.quantile(w, 0.85)),
      "sample": sample,
      "feats": rng.standard_normal((n * p, d)).astype(np.float32),
      "patches_per_image": np.array(p),
  }


def _png(path):
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_diagnosis_figures(tmp_path):
  diag = _diag()
  figures.plot_embedding(str(tmp_path / "e.png"), diag)
  figures.plot_weights(str(tmp_path / "w.png"), diag)
  _png(tmp_path / "e.png")
  _png(tmp_path / "w.png")
  # No discriminator weights: no histogram.
  del diag["weights/softpatch_lof"]
  diag["names"] = np.array(["patchcore"])
  figures.plot_weights(str(tmp_path / "none.png"), diag)
  assert not (tmp_path / "none.png").exists()


def _agg(ratios, methods=("patchcore", "softpatch_lof")):
  out = []
  for overlap in ("True", "False"):
    for r in ratios:
      for m in methods:
        out.append(
            dict(
                setting=(("noise.overlap", overlap), ("noise.ratio", r)),
                category="mean",
                method=m,
                metric="image_auroc",
                mean=0.9 - float(r),
                std=0.01,
                n=3,
            )
        )
  return out


def test_trend(tmp_path):
  path = str(tmp_path / "trend.png")
  assert figures.plot_trend(
      path, _agg(["0", "0.1", "0.4"]), ["patchcore"], "image_auroc"
  )
  _png(path)
  # One noise ratio (or none): no trend to draw.
  assert not figures.plot_trend(
      str(tmp_path / "t1.png"), _agg(["0.1"]), ["patchcore"], "image_auroc"
  )
  assert not (tmp_path / "t1.png").exists()


def _cells(axes):
  base = defaults.study_base("synthetic")
  return studies.make_cells(defaults.experiment_config(base, axes, "t"))


def test_diagnosis_cell_choice(monkeypatch):
  cells = _cells("noise.ratio=0.1,0.4,0.2;seed=0,1")
  study = ml_collections.ConfigDict({"diagnose": "auto"})
  assert figures.diagnosis_cell(cells, study) == 2  # ratio 0.4, seed 0
  assert figures.diagnosis_cell(_cells("noise.ratio=0;seed=0"), study) is None
  study.diagnose = "none"
  assert figures.diagnosis_cell(cells, study) is None
  monkeypatch.setattr(figures, "Figure", None)
  study.diagnose = "auto"
  assert figures.diagnosis_cell(cells, study) is None


def test_without_matplotlib(monkeypatch, tmp_path, caplog):
  monkeypatch.setattr(figures, "Figure", None)
  study = ml_collections.ConfigDict({"metrics": "image_auroc"})
  with caplog.at_level(logging.INFO):
    got = figures.write_all(str(tmp_path), study, _agg(["0", "0.1"]), ["a"])
  assert got == [] and list(tmp_path.iterdir()) == []
  assert "matplotlib is not installed" in caplog.text


def test_trend_names_the_protocol(tmp_path, monkeypatch):
  agg = _agg(["0", "0.1", "0.4"])
  agg += [
      dict(a, metric="image_auroc_excl_injected", mean=a["mean"] + 0.01)
      for a in agg
  ]
  saved = []
  monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig))
  assert figures.plot_trend(
      str(tmp_path / "t.png"),
      agg,
      {"patchcore": "PC", "softpatch_lof": "SP"},
      ["image_auroc", "image_auroc_excl_injected"],
  )
  axes = [ax for ax in saved[0].axes if ax.get_visible()]
  titles = [ax.get_title() for ax in axes]
  # overlap / no overlap for the plain metric; the no-overlap metric of the
  # overlap cells once, not subtitled as an overlap panel.
  assert len(titles) == 3, titles
  assert titles[0].endswith("\noverlap") and titles[1].endswith("\nno overlap")
  assert "without the injected" in titles[2]
  assert titles[2].endswith("overlap models, injected test images left out")
  assert not any("noise.overlap" in t for t in titles)
  assert [t.get_text() for t in axes[0].get_legend().get_texts()] == [
      "PC",
      "SP",
  ]
