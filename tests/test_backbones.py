"""backbones registry: load(), taps, random weights, input validation."""

import os

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
from flax import traverse_util

from softpatch_jax import backbones
from softpatch_jax import cli_flags
from softpatch_jax import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL = [
    "resnet18",
    "wide_resnet50_2",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
]


def test_list_backbones():
  assert backbones.list_backbones() == sorted(ALL)


def test_backbones_are_a_registry_refusing_duplicates():
  assert "resnet18" in backbones.BACKBONES
  with pytest.raises(ValueError, match="already registered"):
    backbones.BACKBONES.register("resnet18", object())


def test_unknown_name_lists_available():
  with pytest.raises(
      ValueError, match="unknown backbone 'vgg16'; choose from efficientnet"
  ):
    backbones.load("vgg16", weights="random")


@pytest.mark.parametrize(
    "name,tap", [("resnet18", "stage3"), ("efficientnet_lite0", "layer2")]
)
def test_unknown_tap_lists_valid(name, tap):
  with pytest.raises(ValueError, match=f"{tap}.*valid taps"):
    backbones.load(name, weights="random", layers=(tap,))


@pytest.mark.parametrize(
    "layers",
    [
        "layer1,layer2",
        " layer1 , layer2 ",
        ("layer1,layer2",),
        ["layer1", "layer2"],
    ],
)
def test_layers_as_comma_string(layers):
  bb = backbones.load("resnet18", weights="random", layers=layers)
  assert bb.layers == ("layer1", "layer2")
  assert tuple(bb(np.zeros((1, 32, 32, 3), np.float32))) == bb.layers


def test_analogue_hint_for_the_other_family():
  with pytest.raises(ValueError) as e:
    backbones.load(
        "efficientnet_lite0", weights="random", layers="layer2,layer3"
    )
  msg = str(e.value)
  assert msg.startswith(
      "efficientnet_lite0: unknown tap(s) ('layer2', 'layer3'); valid taps:"
  )
  assert "layer2 -> stage3, layer3 -> stage5 (layers=stage3,stage5;" in msg
  with pytest.raises(ValueError) as e:
    backbones.load("resnet18", weights="random", layers=("stage3",))
  msg = str(e.value)
  assert "stage3 -> layer2 (layers=layer2;" in msg
  assert (
      "ResNet layer2,layer3 correspond to EfficientNet-Lite stage3,stage5"
      in msg
  )
  # Names of neither family get no hint.
  with pytest.raises(ValueError) as e:
    backbones.load("resnet18", weights="random", layers="conv9")
  assert "analogue" not in str(e.value)
  with pytest.raises(ValueError, match="no tap named"):
    backbones.load("resnet18", weights="random", layers=" , ")


def _flag_config(*overrides):
  """The mvtec config parsed from a real command line, as main.py does."""
  argv = [
      "prog",
      f"--config={cli_flags.config_path('mvtec')}",
      "--config.backbone.weights=random",
      *overrides,
  ]
  fv = flags.FlagValues()
  # The overrides are read from sys_argv (sys.argv by default).
  holder = config_flags.DEFINE_config_file(
      "config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return holder.value


def test_comma_layers_from_the_command_line():
  c = _flag_config(
      "--config.backbone.name=efficientnet_lite0",
      "--config.backbone.layers=stage3,stage5",
  )
  # ml_collections hands a tuple-typed field the whole string as one item.
  assert tuple(c.backbone.layers) == ("stage3,stage5",)
  assert options.from_config(c).backbone.load().layers == ("stage3", "stage5")
  c = _flag_config("--config.backbone.name=resnet18")  # the config's tuple
  assert options.from_config(c).backbone.load().layers == ("layer2", "layer3")
  c = _flag_config(
      "--config.backbone.name=resnet18",
      '--config.backbone.layers=("layer1", "layer3")',
  )
  assert options.from_config(c).backbone.load().layers == ("layer1", "layer3")


def test_bad_weights_argument():
  with pytest.raises(ValueError, match="does_not_exist.pth"):
    backbones.load("resnet18", weights="/nonexistent/does_not_exist.pth")


@pytest.mark.parametrize(
    "name,default,mean",
    [
        ("resnet18", ("layer2", "layer3"), (0.485, 0.456, 0.406)),
        ("efficientnet_lite0", ("stage3", "stage5"), (127 / 255,) * 3),
    ],
)
def test_random_weights_and_defaults(name, default, mean):
  a = backbones.load(name, weights="random", seed=0)
  b = backbones.load(name, weights="random", seed=0)
  c = backbones.load(name, weights="random", seed=1)
  assert a.name == name and a.layers == default and a.default_layers == default
  assert a.weights_id == "random:0" and c.weights_id == "random:1"
  np.testing.assert_allclose(a.mean, mean)
  assert len(a.std) == 3
  leaves = lambda bb: jax.tree_util.tree_leaves(bb.variables)  # noqa: E731
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))
  stats = traverse_util.flatten_dict(a.variables["batch_stats"])
  for path, v in stats.items():
    np.testing.assert_array_equal(v, 0.0 if path[-1] == "mean" else 1.0)
  x = np.random.default_rng(0).normal(size=(2, 64, 48, 3)).astype(np.float32)
  out = a(x)
  assert tuple(out) == default
  for tap, f in out.items():
    s = a.tap_strides[tap]
    assert f.shape[:3] == (2, -(-64 // s), -(-48 // s)), (tap, f.shape)
    assert f.dtype == np.float32 and np.isfinite(np.asarray(f)).all()
  # module.apply(variables, x) has the same taps and shapes as the jitted call.
  direct = jax.eval_shape(a.module.apply, a.variables, x)
  assert {t: d.shape for t, d in direct.items()} == {
      t: f.shape for t, f in out.items()
  }


@pytest.mark.parametrize(
    "name,taps,unused",
    [
        ("resnet18", ("layer1",), ("layer2_0", "layer4_1", "fc")),
        (
            "efficientnet_lite0",
            ("stage2", "stage1"),
            ("blocks_3", "conv_head", "fc"),
        ),
    ],
)
def test_stops_after_last_requested_tap(name, taps, unused):
  bb = backbones.load(name, weights="random", layers=taps, seed=3)
  x = np.zeros((1, 32, 32, 3), np.float32)
  full = bb(x)
  assert set(full) == set(taps)
  # Later modules' variables are not needed at all.
  pruned = {
      col: {k: v for k, v in tree.items() if k not in unused}
      for col, tree in bb.variables.items()
  }
  out = bb.module.apply(pruned, x)
  for t in taps:
    np.testing.assert_array_equal(out[t], full[t])


def test_tap_order_and_all_taps_lite():
  bb = backbones.load(
      "efficientnet_lite0",
      weights="random",
      layers=("logits", "features", "stage7", "stage4"),
  )
  out = bb(np.zeros((1, 64, 64, 3), np.float32))
  assert out["logits"].shape == (1, 1000)
  assert out["features"].shape == (1, 2, 2, 1280)
  assert out["stage7"].shape == (1, 2, 2, 320)
  assert out["stage4"].shape == (1, 4, 4, 80)


def test_input_validation():
  bb = backbones.load("resnet18", weights="random", layers=("layer1",))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    bb(np.zeros((1, 3, 32, 32), np.float32))


def test_input_size_hints():
  assert (
      backbones.load("efficientnet_lite2", weights="random").input_size == 260
  )
  assert backbones.load("resnet18", weights="random").input_size == 224


def test_random_variables_match_flax_default_init():
  import flax.linen as nn
  import jax.numpy as jnp
  from softpatch_jax.backbones import _convert

  class Small(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(64, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=True)(x)
      x = nn.Conv(64, (5, 5), feature_group_count=64, use_bias=False)(x)
      return nn.Dense(300)(x.mean((1, 2)))

  m = Small()
  x = jnp.zeros((1, 8, 8, 32))
  ref = m.init(jax.random.PRNGKey(0), x)
  got = _convert.random_variables(
      jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x)), 4
  )
  assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(got)
  for r, g in zip(
      jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)
  ):
    assert r.shape == g.shape and g.dtype == np.float32
    if np.std(r) > 0:  # kernels: same scale as flax's lecun_normal
      assert abs(np.std(g) / np.std(r) - 1) < 0.1
      assert np.abs(g).max() <= 2 * np.std(r) / 0.8796 * 1.1
    else:
      np.testing.assert_array_equal(r, g)
  m.apply(got, x)  # usable as-is
