"""ResNet-18 / Wide-ResNet-50-2: parity with a torch reference, converter, weights cache."""

import hashlib
import io
import os
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from softpatch_jax import backbones
from softpatch_jax import torch_pickle
from softpatch_jax.backbones import _weights, resnet

# ---------------------------------------------------------------- torch reference
# A plain torch.nn re-statement of the torchvision ResNet (same module names, so
# its state_dict keys are torchvision's).


class _Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, width_factor):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or cin != planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(
        y + (x if self.downsample is None else self.downsample(x))
    )


class _Bottle(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, width_factor):
    super().__init__()
    w = planes * width_factor
    self.conv1 = nn.Conv2d(cin, w, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(w)
    self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(w)
    self.conv3 = nn.Conv2d(w, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or cin != planes * 4:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
          nn.BatchNorm2d(planes * 4),
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(
        y + (x if self.downsample is None else self.downsample(x))
    )


class TorchResNet(nn.Module):

  def __init__(self, block, stages, width_factor=1):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, n in enumerate(stages):
      planes = 64 * 2**i
      blocks = []
      for b in range(n):
        blocks.append(
            block(cin, planes, 2 if (b == 0 and i > 0) else 1, width_factor)
        )
        cin = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, 1000)

  def forward(self, x):
    out = {}
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
      out[f"layer{i}"] = x
    out["logits"] = self.fc(x.mean((2, 3)))
    return out


_ARCH = {
    "resnet18": (_Basic, (2, 2, 2, 2), 1),
    "wide_resnet50_2": (_Bottle, (3, 4, 6, 3), 2),
}


def _random_torch_resnet(name, seed):
  torch.manual_seed(seed)
  block, stages, wf = _ARCH[name]
  model = TorchResNet(block, stages, wf)
  g = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
  return model.eval()


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _save(model, path, zip_format=True):
  torch.save(
      model.state_dict(), path, _use_new_zipfile_serialization=zip_format
  )
  return path


@pytest.mark.parametrize(
    "name,size,layers",
    [
        ("resnet18", 64, ("layer1", "layer2", "layer3", "layer4", "logits")),
        ("wide_resnet50_2", 64, ("layer1", "layer2", "layer3")),
    ],
)
def test_parity_with_torch_reference(tmp_path, name, size, layers):
  for seed in (0, 1):
    model = _random_torch_resnet(name, seed)
    path = _save(model, tmp_path / f"{name}_{seed}.pth", zip_format=bool(seed))
    bb = backbones.load(name, weights=str(path), layers=layers)
    x = torch.randn(
        2 if name == "resnet18" else 1,
        3,
        size,
        size,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
      ref = model(x)
    got = bb(x.permute(0, 2, 3, 1).numpy())
    assert tuple(got) == layers
    for tap in layers:
      want = ref[tap].numpy()
      want = want.transpose(0, 2, 3, 1) if want.ndim == 4 else want
      assert got[tap].shape == want.shape, tap
      assert _rel_err(got[tap], want) < 1e-4, (
          name,
          seed,
          tap,
          _rel_err(got[tap], want),
      )
    assert bb.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()


def test_odd_input_size_matches_torch(tmp_path):
  # Odd sizes exercise torch's floor in strided conv / pooling.
  model = _random_torch_resnet("resnet18", 3)
  path = _save(model, tmp_path / "r18.pth")
  bb = backbones.load(
      "resnet18", weights=str(path), layers=("layer2", "layer3")
  )
  x = torch.randn(1, 3, 53, 71, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = model(x)
  got = bb(x.permute(0, 2, 3, 1).numpy())
  for tap in ("layer2", "layer3"):
    want = ref[tap].numpy().transpose(0, 2, 3, 1)
    assert got[tap].shape == want.shape
    assert _rel_err(got[tap], want) < 1e-4


def test_converter_reports_missing_unexpected_and_shapes(tmp_path):
  sd = {
      k: v.numpy()
      for k, v in _random_torch_resnet("resnet18", 0).state_dict().items()
  }
  sd.pop("layer2.0.downsample.0.weight")
  sd["extra.weight"] = np.zeros(3, np.float32)
  sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 5, 5), np.float32)
  bad = tmp_path / "bad.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, bad)
  with pytest.raises(ValueError) as e:
    backbones.load("resnet18", weights=str(bad))
  msg = str(e.value)
  assert "bad.pth" in msg
  assert "layer2.0.downsample.0.weight" in msg and "missing" in msg
  assert "extra.weight" in msg and "unexpected" in msg
  assert "layer1.0.conv1.weight" in msg and "(64, 64, 5, 5)" in msg


def test_wrong_architecture_file(tmp_path):
  path = _save(_random_torch_resnet("resnet18", 0), tmp_path / "r18.pth")
  with pytest.raises(ValueError, match="r18.pth.*unexpected keys"):
    backbones.load("efficientnet_lite0", weights=str(path))


def test_torch_module_name():
  assert resnet.torch_module_name("layer3_5") == "layer3.5"
  assert resnet.torch_module_name("downsample_0") == "downsample.0"
  assert resnet.torch_module_name("conv1") == "conv1"


# ------------------------------------------------------------- weights cache


def _fake_weights(tmp_path):
  path = _save(_random_torch_resnet("resnet18", 5), tmp_path / "src.pth")
  blob = path.read_bytes()
  return blob, hashlib.sha256(blob).hexdigest()


def test_checksum_mismatch_on_cached_file(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "resnet18-0123abcd.pth").write_bytes(b"corrupted download")
  with pytest.raises(ValueError, match="resnet18-0123abcd.pth.*0123abcd"):
    _weights.fetch("https://example.invalid/resnet18-0123abcd.pth", cache)


def test_download_checks_hash_and_renames(tmp_path, monkeypatch):
  blob, digest = _fake_weights(tmp_path)
  name = f"resnet18-{digest[:8]}.pth"
  calls = []

  def fake_urlopen(url, timeout=None):
    calls.append(url)
    return io.BytesIO(blob)

  monkeypatch.setattr(_weights.urllib.request, "urlopen", fake_urlopen)
  monkeypatch.setitem(
      resnet.IMAGENET_URLS, "resnet18", f"https://example.invalid/{name}"
  )
  monkeypatch.setenv("SOFTPATCH_JAX_CACHE", str(tmp_path / "envcache"))
  bb = backbones.load("resnet18", weights="imagenet")
  assert bb.weights_id == digest
  assert sorted(os.listdir(tmp_path / "envcache")) == [
      name
  ]  # no temp file left
  backbones.load(
      "resnet18", weights="imagenet", layers=("layer1",)
  )  # served from cache
  assert len(calls) == 1


def test_download_bad_hash_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(
      _weights.urllib.request,
      "urlopen",
      lambda url, timeout=None: io.BytesIO(b"truncated"),
  )
  with pytest.raises(ValueError, match="does not match"):
    _weights.fetch("https://example.invalid/resnet18-f37072fd.pth", tmp_path)
  assert os.listdir(tmp_path) == []


def test_offline_error_tells_user_to_pass_a_path(tmp_path, monkeypatch):
  def offline(url, timeout=None):
    raise urllib.error.URLError("Temporary failure in name resolution")

  monkeypatch.setattr(_weights.urllib.request, "urlopen", offline)
  with pytest.raises(
      backbones.WeightsUnavailableError,
      match=r"wide_resnet50_2-95faca4d\.pth.*weights='/path/to/",
  ):
    backbones.load("wide_resnet50_2", weights="imagenet", cache_dir=tmp_path)
  assert os.listdir(tmp_path) == []


def test_reader_is_torch_free_for_resnet_files(tmp_path):
  # The numpy reader returns exactly torch's tensors for a torchvision-layout file.
  model = _random_torch_resnet("resnet18", 1)
  path = _save(model, tmp_path / "r.pth")
  got = torch_pickle.load_state_dict(path)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(got[k], v.numpy())
