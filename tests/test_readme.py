"""The README's research-API snippet runs exactly as printed."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippet():
  text = README.read_text(encoding="utf-8")
  section = text.split("## The research API", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_research_snippet_runs():
  code = _snippet()
  assert 10 <= len([l for l in code.splitlines() if l.strip()]) <= 20
  ns = {}
  exec(compile(code, str(README), "exec"), ns)  # pylint: disable=exec-used
  feats, weights, bank = ns["feats"], ns["weights"], ns["bank"]
  assert feats.shape == (10, 144, 1024)
  assert weights.shape == (10, 144) and np.all(np.isfinite(weights))
  assert bank.size == int(0.1 * 10 * 144)
  assert ns["image_scores"].shape == (6,)
  assert ns["maps"].shape == (6, 96, 96)
  np.testing.assert_array_equal(
      np.asarray(ns["image_scores"]), np.asarray(ns["patch_scores"]).max(-1)
  )
  # The bank never holds a patch the LOF flagged as an outlier.
  fit = ns["fit"]
  outliers = np.asarray(fit.outliers).reshape(-1)
  assert not outliers[np.asarray(fit.indices)[np.asarray(fit.valid)]].any()
