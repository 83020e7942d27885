"""softpatch_jax.studies: cells from axes and presets, and the tables against
plain numpy, plus every experiment config's cell list."""

import glob
import importlib.util
import inspect
import os

import ml_collections
import numpy as np
import pytest

from softpatch_jax import cli_flags
from softpatch_jax import defaults
from softpatch_jax import methods
from softpatch_jax import studies
from softpatch_jax import study_tables

CONFIGS = sorted(
    p
    for p in glob.glob(
        os.path.join(cli_flags.CONFIG_DIR, "experiments", "*.py")
    )
    if not p.endswith("__init__.py")
)


def _load(path):
  spec = importlib.util.spec_from_file_location(
      "exp_" + os.path.basename(path)[:-3], path
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_the_paper_studies_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {
      "noise_sweep",
      "discriminators",
      "augmented_overlap",
      "methods_x_datasets",
      "timing",
  } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_experiment_config_generates_its_cells(path):
  mod = _load(path)
  doc = mod.__doc__ or ""
  assert "python -m softpatch_jax.experiments" in doc
  assert "xpected" in doc
  default = inspect.signature(mod.get_config).parameters["variant"].default
  variants = {default, "mvtec", "btad"}
  if default != "offline":
    variants.add("synthetic")
  for variant in sorted(variants):
    c = mod.get_config(variant)
    cells = studies.make_cells(c)  # no data is read for these categories
    ids = [cell.id for cell in cells]
    assert cells and len(set(ids)) == len(ids), variant
    assert ids == [
        cell.id for cell in studies.make_cells(mod.get_config(variant))
    ]
    assert [cell.index for cell in cells] == list(range(len(cells)))
    for cell in cells:
      methods.parse_methods(cell.config.methods)
      assert cell.config.data.dataset in ("elpv", "synthetic", "mvtec", "btad")
    assert studies.repeat_axes(c.study) in (["seed"], [])


def _config(axes="noise.ratio=0,0.2;seed=0,1", **study):
  base = defaults.study_base("synthetic")
  base.methods = "softpatch_lof,patchcore"
  c = defaults.experiment_config(base, axes, "t", "image_auroc,fit_s")
  for k, v in study.items():
    c.study[k] = v
  return c


def test_cells_order_and_fields():
  c = _config("noise.overlap=True,False;noise.ratio=0,0.1;seed=3,4")
  cells = studies.make_cells(c)
  assert len(cells) == 8
  # The last axis varies fastest.
  assert [x.values for x in cells[:2]] == [
      (("noise.overlap", "True"), ("noise.ratio", "0"), ("seed", "3")),
      (("noise.overlap", "True"), ("noise.ratio", "0"), ("seed", "4")),
  ]
  last = cells[-1].config
  assert last.noise.overlap is False and last.noise.ratio == 0.1
  assert isinstance(last.noise.ratio, float)
  assert last.seed == 4 and last.noise.seed == 4  # 'seed' sets both
  assert c.base.seed == 0  # the base is untouched
  assert cells[0].id == "noise.overlap=True,noise.ratio=0,seed=3,category=synth"
  assert "," not in cells[0].slug and "/" not in cells[0].slug
  # The hash follows the configuration but not the output options.
  assert cells[0].config_hash() != cells[1].config_hash()
  again = studies.make_cells(c)[0]
  again.config.output.num_heatmaps = 9
  assert again.config_hash() == cells[0].config_hash()
  again.config.denoise.lof_k = 9
  assert again.config_hash() != cells[0].config_hash()


def test_presets_and_categories():
  c = _config("dataset=a,b;seed=0")
  c.study.presets.dataset = ml_collections.ConfigDict({
      "a": "data.dataset=elpv data.categories=mono,poly",
      "b": "data.dataset=synthetic data.categories=synth data.resize=64",
  })
  cells = studies.make_cells(c)
  assert [(x.values[0][1], x.category) for x in cells] == [
      ("a", "mono"),
      ("a", "poly"),
      ("b", "synth"),
  ]
  assert cells[2].config.data.resize == 64 and cells[0].config.data.resize == 96


@pytest.mark.parametrize(
    "axes,match",
    [
        ("noise.ratio", "bad axis"),
        ("noise.ratio=", "bad axis"),
        ("noise.ratio=0;noise.ratio=1", "repeats"),
        ("noise.ratoi=0.1", "no config field 'noise.ratoi'"),
        ("noise.overlap='x'", "noise.overlap"),
        ("dataset=c", "presets.dataset has no 'c'"),
    ],
)
def test_bad_axes(axes, match):
  c = _config(axes)
  c.study.presets.dataset = ml_collections.ConfigDict({"a": "seed=1"})
  with pytest.raises(ValueError, match=match):
    studies.make_cells(c)


def test_bad_repeat_and_config():
  with pytest.raises(ValueError, match="repeat names axes"):
    studies.make_cells(_config("noise.ratio=0", repeat="seed"))
  with pytest.raises(ValueError, match="needs `base`"):
    studies.make_cells(ml_collections.ConfigDict({"study": {}}))


def test_parse_value():
  assert studies.parse_value("0.1") == 0.1
  assert studies.parse_value("True") is True
  assert studies.parse_value("mono") == "mono"
  assert studies.parse_value("'a b'") == "a b"


def _rows(cells, rng, methods_=("softpatch_lof", "patchcore")):
  rows = []
  for cell in cells:
    for m in methods_:
      rows.append(
          dict(
              cell=cell.id,
              config_hash=cell.config_hash(),
              method=m,
              image_auroc=f"{rng.uniform(0.5, 1):.6g}",
              fit_s=f"{rng.uniform(1, 9):.6g}",
          )
      )
  return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  c = _config("noise.ratio=0,0.2;seed=0,1,2")
  c.study.presets.dataset = ml_collections.ConfigDict()
  c.base.data.dataset = "elpv"
  c.base.data.categories = "mono,poly"
  cells = studies.make_cells(c)
  rows = _rows(cells, rng)
  rows.append(dict(rows[0], config_hash="stale", image_auroc="0"))  # ignored
  rows[1]["image_auroc"] = "n/a"  # a missing value
  agg = study_tables.aggregate(c, cells, rows)
  got = {
      (a["setting"], a["category"], a["method"], a["metric"]): a for a in agg
  }
  for ratio in ("0", "0.2"):
    setting = (("noise.ratio", ratio),)
    for m in ("softpatch_lof", "patchcore"):
      for metric in ("image_auroc", "fit_s"):
        val = {}
        for cell, r in zip(
            [x for x in cells for _ in range(2)], rows[: 2 * len(cells)]
        ):
          if cell.values[0][1] == ratio and r["method"] == m:
            v = r[metric]
            if v != "n/a":
              val[(cell.values[1][1], cell.category)] = float(v)
        for cat in ("mono", "poly"):
          x = [v for (s, k), v in val.items() if k == cat]
          a = got[(setting, cat, m, metric)]
          assert a["n"] == len(x)
          np.testing.assert_allclose(a["mean"], np.mean(x))
          np.testing.assert_allclose(a["std"], np.std(x, ddof=1))
        runs = [
            np.mean([val[(s, "mono")], val[(s, "poly")]])
            for s in "012"
            if (s, "mono") in val and (s, "poly") in val
        ]
        a = got[(setting, "mean", m, metric)]
        assert a["n"] == len(runs)
        np.testing.assert_allclose(a["mean"], np.mean(runs))
        np.testing.assert_allclose(a["std"], np.std(runs, ddof=1))


def test_format_tables_layout():
  c = _config("noise.ratio=0,0.2;seed=0,1")
  cells = studies.make_cells(c)
  rows = _rows(cells, np.random.default_rng(0))
  agg = study_tables.aggregate(c, cells, rows)
  text = study_tables.format_tables(c, cells, agg)
  a = next(
      a
      for a in agg
      if a["category"] == "mean"
      and a["method"] == "patchcore"
      and a["metric"] == "image_auroc"
      and a["setting"] == (("noise.ratio", "0.2"),)
  )
  assert f"{a['mean']:.3f} ± {a['std']:.3f}" in text
  assert "| category | SoftPatch-LOF | PatchCore |" in text
  assert "| method | noise.ratio=0 | noise.ratio=0.2 |" in text
  assert "## fit_s: noise.ratio=0" in text
  # Nothing run yet: every entry is '-'.
  empty = study_tables.format_tables(c, cells, [])
  assert "n/a for every cell" in empty


def test_labels():
  assert studies.label("padim_filter+patchcore") == "PaDiM*+PatchCore"
  assert studies.label("softpatch_fusion_vote") == "SoftPatch-fusion-vote"
  assert studies.label("cflow") == "CFLOW"
  assert studies.label("something_new") == "something_new"


def _protocol_rows(cells, rng):
  rows = _rows(cells, rng, ("patchcore", "padim_filter+patchcore"))
  for r in rows:
    r["image_auroc_excl_injected"] = f"{rng.uniform(0.5, 1):.6g}"
    if r["method"] == "padim_filter+patchcore":
      r["image_filter_backbone"] = "efficientnet_lite0"
      r["image_filter_fallback"] = "True"
    else:
      r["image_filter_backbone"] = "n/a"
  return rows


def test_protocol_axis_timing_rows_and_filter_backbone():
  c = _config(
      "noise.overlap=True,False;noise.ratio=0,0.2;seed=0,1",
      metrics="image_auroc,image_auroc_excl_injected,fit_s",
  )
  c.base.methods = "patchcore,padim_filter+patchcore"
  c.base.data.dataset = "elpv"
  c.base.data.categories = "mono,poly"
  cells = studies.make_cells(c)
  rows = _protocol_rows(cells, np.random.default_rng(0))
  agg = study_tables.aggregate(c, cells, rows)
  text = study_tables.format_tables(c, cells, agg, rows)
  assert "noise.overlap" not in text
  assert "| method | overlap, noise.ratio=0 | overlap, noise.ratio=0.2 | " in (
      text
  )
  assert "no overlap, noise.ratio=0.2 |" in text
  assert "## image_auroc: no overlap, noise.ratio=0.2" in text
  # The no-overlap result of the overlap cells, never of no-overlap cells.
  excl = [ln for ln in text.splitlines() if "image_auroc_excl_injected:" in ln]
  assert len(excl) == 4, excl  # title, summary, two settings
  assert not [ln for ln in excl if "no overlap," in ln], excl
  assert "overlap models, injected test images left out, noise.ratio=0.2" in (
      text
  )
  # The fallback filter backbone, in the label and in a footnote.
  name = "PaDiM*(filter: efficientnet_lite0, fallback)+PatchCore"
  assert f"| category | PatchCore | {name} |" in text
  assert (
      f"{name}: the PaDiM* image filter ran on efficientnet_lite0 "
      "(fallback: no resnet18 weights) in 16 cell(s)."
      in text
  )
  assert "PatchCore: the PaDiM* image filter" not in text.replace(name, "")
  # Timings: a per-category mean and a total, each over the seeds.
  assert "| mean per category |" in text and "| total (2 categories) |" in text
  setting = (("noise.overlap", "True"), ("noise.ratio", "0.2"))
  by = {
      (a["category"], a["method"]): a
      for a in agg
      if a["setting"] == setting and a["metric"] == "fit_s"
  }
  for m in ("patchcore", "padim_filter+patchcore"):
    runs = [
        [
            float(r["fit_s"])
            for r, cell in zip(rows, [x for x in cells for _ in range(2)])
            if r["method"] == m
            and cell.values[:2] == setting
            and cell.values[2][1] == seed
        ]
        for seed in "01"
    ]
    np.testing.assert_allclose(
        by[("total", m)]["mean"], np.mean(np.sum(runs, 1))
    )
    np.testing.assert_allclose(by[("mean", m)]["mean"], np.mean(runs))
    np.testing.assert_allclose(
        by[("total", m)]["std"], np.std(np.sum(runs, 1), ddof=1)
    )
  assert not [
      a
      for a in agg
      if a["category"] == "total" and a["metric"] == "image_auroc"
  ]
  # Without a fallback the label is the plain one.
  for r in rows:
    r["image_filter_fallback"] = "False"
  names, notes = study_tables.method_labels(cells, rows)
  assert names["padim_filter+patchcore"] == "PaDiM*+PatchCore"
  assert notes == [
      "PaDiM*+PatchCore: the PaDiM* image filter ran on efficientnet_lite0 "
      "in 16 cell(s)."
  ]


@pytest.mark.parametrize("name", ["noise_sweep", "discriminators"])
@pytest.mark.parametrize("variant", ["elpv", "synthetic"])
def test_the_protocol_is_an_axis(name, variant):
  path = os.path.join(cli_flags.CONFIG_DIR, "experiments", f"{name}.py")
  c = _load(path).get_config(variant)
  axes = dict(studies.parse_axes(c.study.axes))
  assert axes["noise.overlap"] == ["True", "False"]
  assert "excl_injected" not in c.study.metrics
  cells = studies.make_cells(c)
  assert {cell.config.noise.overlap for cell in cells} == {True, False}
  n = len(cells)
  assert (
      n
      == {
          ("noise_sweep", "elpv"): 48,
          ("noise_sweep", "synthetic"): 24,
          ("discriminators", "elpv"): 36,
          ("discriminators", "synthetic"): 18,
      }[(name, variant)]
  )
  assert f"{n}" in _load(path).__doc__


def test_timing_shows_the_filter():
  path = os.path.join(cli_flags.CONFIG_DIR, "experiments", "timing.py")
  metrics = _load(path).get_config().study.metrics.split(",")
  assert "fit_s" in metrics and "filter_s" in metrics
