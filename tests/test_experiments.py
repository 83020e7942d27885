"""softpatch_jax.experiments: a tiny study end to end (results, tables,
figures), and resuming after an interrupt without recomputing a cell."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from softpatch_jax import defaults
from softpatch_jax import experiments
from softpatch_jax import figures
from softpatch_jax import fitting
from softpatch_jax import studies
from softpatch_jax.baselines import image_filter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(axes="noise.ratio=0,0.3;seed=0"):
  b = defaults.study_base("synthetic")
  b.data.resize = b.data.crop = b.data.synthetic.size = 48
  b.data.synthetic.n_train = 10
  b.data.synthetic.n_test_good = 4
  b.data.synthetic.n_test_defect = 6
  b.data.batch_size = 8
  b.methods = "softpatch_lof,patchcore"
  return defaults.experiment_config(b, axes, "tiny", "image_auroc,pixel_auroc")


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  with pytest.MonkeyPatch.context() as mp:
    # Fewer patches in the t-SNE: its time grows with them.
    mp.setattr(figures, "_N_RANDOM", 150)
    mp.setattr(figures, "_N_BANK", 50)
    mp.setattr(figures, "_N_REMOVED", 50)
    return workdir, experiments.run(_tiny(), workdir)


def test_tiny_study_writes_results_tables_and_figures(tiny_run):
  workdir, out = tiny_run
  assert out["cells"] == out["ran"] == 2
  rows = _csv(os.path.join(workdir, "results.csv"))
  assert [(r["noise.ratio"], r["method"]) for r in rows] == [
      ("0", "softpatch_lof"),
      ("0", "patchcore"),
      ("0.3", "softpatch_lof"),
      ("0.3", "patchcore"),
  ]
  assert {r["n_injected"] for r in rows} == {"0", "3"}
  for r in rows:
    assert 0 <= float(r["image_auroc"]) <= 1
    assert 0 <= float(r["pixel_auroc"]) <= 1
  with open(os.path.join(workdir, "table.md"), encoding="utf-8") as f:
    table = f.read()
  assert table == out["table"]
  lof = float(rows[2]["image_auroc"])
  assert f"| synth | {lof:.3f} |" in table
  agg = _csv(os.path.join(workdir, "table.csv"))
  assert {a["metric"] for a in agg} == {"image_auroc", "pixel_auroc"}
  for name in ("trend.png", "embedding.png", "weights.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000, name
  # Every cell keeps its per-category details.
  assert sorted(os.listdir(os.path.join(workdir, "cells"))) == sorted(
      c.slug for c in studies.make_cells(_tiny())
  )
  assert not [f for f in os.listdir(workdir) if f.endswith(".tmp")]


def test_diagnosis_matches_the_noisy_cell(tiny_run):
  workdir, _ = tiny_run
  rows = _csv(os.path.join(workdir, "results.csv"))
  noisy = {r["method"]: r for r in rows if r["noise.ratio"] == "0.3"}
  with np.load(os.path.join(workdir, figures.DIAGNOSIS)) as f:
    diag = {k: f[k] for k in f.files}
  assert str(diag["key"]).startswith(noisy["patchcore"]["cell"] + "|")
  assert diag["injected"].sum() == int(noisy["patchcore"]["n_injected"])
  n, p = diag["weights/softpatch_lof"].shape
  assert n == int(noisy["patchcore"]["n_train"])
  # The refit reproduces the cell's banks and outlier flags.
  for m in ("patchcore", "softpatch_lof"):
    bank = diag[f"bank/{m}"]
    assert bank.size == int(noisy[m]["bank_size"])
    from_injected = diag["injected"][bank // p].sum()
    assert from_injected == int(noisy[m]["bank_from_injected"])
  w = diag["weights/softpatch_lof"]
  flagged = (w > diag["threshold/softpatch_lof"]).sum()
  assert flagged == int(noisy["softpatch_lof"]["n_outlier_patches"])
  assert np.isin(diag["sample"], np.arange(n * p)).all()
  np.testing.assert_array_equal(np.unique(diag["sample"]), diag["sample"])


def test_rerun_computes_nothing(tiny_run, monkeypatch):
  workdir, out = tiny_run

  def fail(*args, **kwargs):
    raise AssertionError("a finished cell ran again")

  monkeypatch.setattr(experiments, "run_cell", fail)
  monkeypatch.setattr(experiments, "diagnose_cell", fail)
  again = experiments.run(_tiny(), workdir)
  assert again["ran"] == 0 and again["table"] == out["table"]


def _fake_cell(calls, stop_after=None):
  """A deterministic stand-in for a cell's pipeline run."""

  def run_cell(cell, embedders, workdir):
    del embedders, workdir
    if stop_after is not None and len(calls) >= stop_after:
      raise KeyboardInterrupt
    calls.append(cell.id)
    c = cell.config
    rng = np.random.default_rng(
        [c.seed, int(100 * c.noise.ratio), c.denoise.lof_k]
    )
    return [
        dict(
            category=cell.category,
            method=m,
            image_auroc=rng.uniform(),
            fit_s=1.5,
        )
        for m in c.methods.split(",")
    ]

  return run_cell


def test_interrupted_run_resumes_to_the_same_table(tmp_path, monkeypatch):
  config = _tiny("noise.ratio=0,0.1,0.2;seed=0,1")
  config.study.figures = False
  whole, calls = str(tmp_path / "whole"), []
  monkeypatch.setattr(experiments, "run_cell", _fake_cell(calls))
  ref = experiments.run(config, whole)
  assert len(calls) == ref["cells"] == 6

  part, calls = str(tmp_path / "part"), []
  monkeypatch.setattr(experiments, "run_cell", _fake_cell(calls, stop_after=4))
  with pytest.raises(KeyboardInterrupt):
    experiments.run(config, part)
  done = list(calls)
  assert len(_csv(os.path.join(part, "results.csv"))) == 4 * 2
  assert not os.path.exists(os.path.join(part, ".softpatch.lock"))

  calls.clear()
  monkeypatch.setattr(experiments, "run_cell", _fake_cell(calls))
  out = experiments.run(config, part)
  assert out["ran"] == 2 and not set(calls) & set(done)
  assert out["table"] == ref["table"]
  for name in ("results.csv", "table.csv", "table.md"):
    with open(os.path.join(part, name)) as a, open(
        os.path.join(whole, name)
    ) as b:
      assert a.read() == b.read(), name

  # A changed setting reruns exactly the cells it touches.
  calls.clear()
  config.study.axes = "noise.ratio=0,0.1,0.2,0.4;seed=0,1"
  out = experiments.run(config, part)
  assert calls == [
      "noise.ratio=0.4,seed=0,category=synth",
      "noise.ratio=0.4,seed=1,category=synth",
  ]
  calls.clear()
  config.base.denoise.lof_k = 4
  out = experiments.run(config, part)
  assert out["ran"] == 8 and len(_csv(os.path.join(part, "results.csv"))) == 16


def test_bad_workdir_file(tmp_path):
  (tmp_path / "results.csv").write_text("category,method\nx,y\n")
  with pytest.raises(ValueError, match="not an experiment results file"):
    experiments.run(_tiny(), str(tmp_path))


def test_command_line(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text(
      "from softpatch_jax import defaults\n"
      "def get_config():\n"
      "  return defaults.experiment_config(defaults.study_base('synthetic'),"
      " 'noise.ratoi=0.1', 't')\n"
  )
  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "softpatch_jax.experiments",
          f"--config={config}",
          f"--workdir={tmp_path / 'out'}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
  )
  assert res.returncode == 1
  assert "error: config.study: no config field 'noise.ratoi'" in res.stderr


class _Clock:
  """A fake `time` module whose perf_counter advances `step` per call."""

  def __init__(self, step):
    self.now, self.step = 0.0, step

  def perf_counter(self):
    self.now += self.step
    return self.now


def test_no_overlap_cell_equals_excl_injected_and_filter_time(
    tmp_path, monkeypatch
):
  # Fake clocks, not wall time: the filter's timer ticks 100 a call, the
  # banks' 1, so the row's fit_s shows whether the filter's part is in it.
  monkeypatch.setattr(image_filter, "time", _Clock(100.0))
  monkeypatch.setattr(fitting, "time", _Clock(1.0))
  # The same seed injects the same images: the overlap=False cell scores
  # the test set the overlap=True cell has without them.
  c = _tiny("noise.overlap=True,False;noise.ratio=0.3;seed=0")
  c.base.methods = "patchcore,padim_filter+patchcore"
  c.study.metrics = "image_auroc,fit_s"
  c.study.figures = False
  c.study.diagnose = "none"
  out = experiments.run(c, str(tmp_path))
  rows = {
      (r["noise.overlap"], r["method"]): r
      for r in _csv(os.path.join(str(tmp_path), "results.csv"))
  }
  for m in ("patchcore", "padim_filter+patchcore"):
    on, off = rows[("True", m)], rows[("False", m)]
    assert int(on["n_test"]) == int(off["n_test"]) + int(on["n_injected"])
    assert float(off["image_auroc"]) == pytest.approx(
        float(on["image_auroc_excl_injected"]), abs=1e-9
    )
    assert off["image_auroc_excl_injected"] == off["image_auroc"]
  f = rows[("False", "padim_filter+patchcore")]
  assert float(f["filter_s"]) == 100.0
  bank_part = float(f["fit_s"]) - float(f["filter_s"])
  assert bank_part == float(rows[("False", "patchcore")]["fit_s"]) > 0
  assert f["image_filter_backbone"] == "efficientnet_lite0"
  assert f["image_filter_fallback"] == "True"  # no resnet18 weights offline
  assert "PaDiM*(filter: efficientnet_lite0, fallback)+PatchCore" in (
      out["table"]
  )
  assert "| method | overlap | no overlap |" in out["table"]
