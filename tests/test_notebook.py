"""notebooks/colab_tpu.ipynb: a valid nbformat v4 notebook whose cells all
compile, and whose cells tagged 'ci' run on a CPU kernel in a fresh folder:
they fit on a generated demo part, score new tiles and show the heatmaps.
"""

import base64
import csv
import os
import pathlib

from IPython.core.inputtransformer2 import TransformerManager
import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")
# ci: CPU-safe and quick; colab: needs Colab; tpu: the long accelerator runs.
TAGS = {"ci", "colab", "tpu"}


def _read():
  return nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)


def _tags(cell):
  return set(cell.metadata.get("tags", ()))


def test_notebook_is_valid_nbformat_v4_without_outputs():
  nb = _read()
  assert (nb.nbformat, nb.nbformat_minor >= 5) == (4, True)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  assert nb.metadata.accelerator == "TPU"
  ids = [c.id for c in nb.cells]
  assert len(set(ids)) == len(ids)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for c in code:
    assert len(_tags(c) & TAGS) == 1 and _tags(c) <= TAGS, (c.id, _tags(c))
    assert not c.outputs and c.execution_count is None, c.id


def test_every_code_cell_compiles():
  # IPython's own transformer turns `!cmd` and `%magic` into Python first.
  transform = TransformerManager().transform_cell
  for c in _read().cells:
    if c.cell_type == "code":
      compile(transform(c.source), f"<cell {c.id}>", "exec")


def test_install_default_job_and_tfds_commands():
  cells = {c.id: c for c in _read().cells}
  install = cells["install"].source
  assert '"pip", "install"' in install and 'SOURCE = ""' in install
  job = cells["default_job"].source
  assert "softpatch evaluate --config=default --workdir out/default" in job
  assert "tpu" in _tags(cells["default_job"])
  text = "\n".join(
      c.source for c in cells.values() if c.cell_type == "markdown"
  )
  for s in ("softpatch fit", "softpatch predict", "source=tfds"):
    assert s in text, s


def _install_cell(capsys, **params):
  """Runs the install cell with DRY_RUN on -> (its namespace, printed)."""
  source = {c.id: c for c in _read().cells}["install"].source
  source = source.replace("DRY_RUN = False", "DRY_RUN = True")
  for name, value in params.items():
    source = source.replace(f'{name} = ""', f"{name} = {value!r}")
  namespace = {}
  exec(compile(source, "<install>", "exec"), namespace)
  return namespace, capsys.readouterr().out


def test_install_cell_with_nothing_to_install_prints_what_to_do(
    tmp_path, monkeypatch, capsys
):
  monkeypatch.chdir(tmp_path)  # no checkout here or above
  ns, out = _install_cell(capsys)
  if ns["find_source"]() is not None:  # an upload in /content
    pytest.skip("a softpatch-jax package lies in /content")
  assert "Nothing to install from yet" in out and "python -m build" in out
  if ns["ACCELERATOR"] != "tpu":
    assert "note: no TPU attached" in out


def test_install_cell_finds_the_checkout_it_runs_in(monkeypatch, capsys):
  monkeypatch.chdir(os.path.join(ROOT, "notebooks"))
  ns, out = _install_cell(capsys)
  if not os.path.isdir("/content/softpatch-jax"):
    assert ns["find_source"]() == ROOT
  assert "install -q softpatch-jax[demo" in out
  assert pathlib.Path(ROOT).as_uri() in out


def test_install_cell_sources(tmp_path, capsys):
  wheel = tmp_path / "softpatch_jax-0.2.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  ns, out = _install_cell(capsys, SOURCE=str(wheel))
  assert "softpatch-jax[demo" in out and f"@ {wheel.as_uri()}" in out
  req = ns["requirement"]
  assert req("https://host/a/softpatch-jax.git", "demo") == (
      "softpatch-jax[demo] @ git+https://host/a/softpatch-jax.git"
  )
  assert req("git@host:a/softpatch-jax.git", "demo,tpu") == (
      "softpatch-jax[demo,tpu] @ git+ssh://git@host/a/softpatch-jax.git"
  )
  with pytest.raises(FileNotFoundError, match="no such file"):
    req(str(tmp_path / "missing.whl"), "demo")


def test_ci_cells_fit_predict_and_show_heatmaps(tmp_path):
  nb = _read()
  nb.cells = [c for c in nb.cells if "ci" in _tags(c)]
  assert [c.id for c in nb.cells] == [
      "setup",
      "images",
      "fit",
      "predict",
      "heatmaps",
  ]
  nbclient.NotebookClient(
      nb,
      timeout=600,
      kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}},
  ).execute()
  work = tmp_path / "softpatch_work"
  assert (work / "model" / "model.softpatch").is_file()
  with open(work / "pred" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  # The demo: 3 normal tiles and 3 per defect type, every one scored.
  kinds = sorted(os.path.basename(os.path.dirname(r["path"])) for r in rows)
  assert kinds == ["blob"] * 3 + ["good"] * 3 + ["scratch"] * 3
  assert not any(r["error"] for r in rows)
  for r in rows:
    want = (
        "anomalous" if float(r["score"]) >= float(r["threshold"]) else "normal"
    )
    assert r["decision"] == want
  score = lambda k: np.mean(
      [float(r["score"]) for r in rows if f"/{k}/" in r["path"]]
  )
  assert score("blob") > score("good") and score("scratch") > score("good")
  # The printed table, highest score first.
  cells = {c.id: c for c in nb.cells}
  printed = "".join(
      o.get("text", "")
      for o in cells["predict"].outputs
      if o.output_type == "stream"
  )
  by_score = sorted(rows, key=lambda r: -float(r["score"]))
  order = [
      os.path.relpath(r["path"], work / "images" / "part" / "test")
      for r in by_score
  ]
  table = [
      ln.split()
      for ln in printed.splitlines()
      if ln.split()[:1] in (["anomalous"], ["normal"])
  ]
  assert [t[-1] for t in table] == order
  assert [t[0] for t in table] == [r["decision"] for r in by_score]
  # Heatmaps shown inline: the 3 highest and the 2 lowest, as their files.
  shown = [
      base64.b64decode(o["data"]["image/png"])
      for o in cells["heatmaps"].outputs
      if o.output_type == "display_data"
  ]
  expected = [
      work / "pred" / r["heatmap"] for r in by_score[:3] + by_score[-2:]
  ]
  assert shown == [p.read_bytes() for p in expected]
  for p in expected:  # the 128 px tile, with its colour bar below
    width, height = Image.open(p).size
    assert width == 128 and height >= 128
