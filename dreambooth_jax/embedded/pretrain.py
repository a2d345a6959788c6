r"""The embedded base model: a tiny Stable Diffusion (the real UNet, VAE and clip_jax text encoder)
trained from scratch on the captioned handwritten digits that ship with scikit-learn.

    python -m dreambooth_jax.embedded.pretrain --workdir runs/digits_sd [--vae_steps 250 --unet_steps 1200]

Two stages, as Stable Diffusion was built: (1) the VAE learns to reconstruct the 32 px digits
(L1 + L2 + a small KL), then its latent scale is measured so that scaled latents have unit
variance (SD's `scaling_factor`); (2) with the VAE and the text encoder frozen (as SD's were; the
encoder also trains with `unet.text_learning_rate` > 0), the UNet learns text-to-image with DreamBooth's own epsilon-prediction loss (`train.make_loss_fn`, every row an
"instance" row with its own caption). 10% of captions are dropped to "" so that classifier-free
guidance works at sampling time. The result is a diffusers-format folder (`<workdir>/export`)
that `python -m dreambooth_jax.train` fine-tunes, and a grid of samples (`<workdir>/samples.png`).
Then 16 images of each "a {digit}" prompt (Table 3's sampler, steps and guidance) are read by an
independent digit classifier (`dreambooth_jax.eval.digit_classifier`, an SVM on pixels): the
share it reads as the named digit, the prompt accuracy, is in `<workdir>/pretrain.json` with the
wall and CPU seconds of each stage and the load average around them.
Each stage runs on the shared training loop (`clip_jax.loop`) in its own folder (`<workdir>/vae`,
`<workdir>/unet`: checkpoints, metrics, loss plot), so an interrupted pretraining resumes.

Why the text encoder is the digits CLIP's text tower, frozen (issue 16): trained jointly from
random weights (or from that tower), the encoder collapsed to nearly one state for every prompt
(after 1,200 steps the "a zero" and "a seven" states differed by 0.18 at most, at norm 8) and the
UNet ignored the text: 13% of "a {digit}" images showed the named digit, chance being 10%. The
frozen tower keeps the digits apart (cosine 0.03-0.5 between digits' end-of-text states) and the
same 1,200 UNet steps reach 99% (benchmarks/results/embedded_sd_prompts.md). Tokens never seen in
the captions (DreamBooth's rare identifier) keep the tower's embeddings, as a rare token of a real
checkpoint carries little meaning.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clip_jax import loop, optim, sharding
from clip_jax.data import digits as digits_lib
from clip_jax.observe import read_metrics, write_atomic
from dreambooth_jax.sampling import pipeline as sd
from dreambooth_jax.sampling import schedulers
from dreambooth_jax import train as db_train
from dreambooth_jax.embedded.tiny import make_tiny_pipeline
from dreambooth_jax.eval import digit_classifier
from dreambooth_jax.models.vae import AutoencoderKL, sample_posterior

# The class prompt of DreamBooth is "a {name}"; the digits' own templates never say it that plainly,
# so it joins them here (otherwise "a seven" would be off the captions' distribution).
EXTRA_TEMPLATES = ("a {name}",)
SAMPLE_PROMPTS = tuple(f"a {name}" for name in digits_lib.CLASS_NAMES)
DIGITS_CLIP = "workdirs/digits"  # the README's first command trains the digits CLIP there


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 32
  c.batch_size = 32
  c.digits = tuple(range(10))  # the digits trained on and sampled (a few: the prompt-accuracy test's short run)
  c.vae = ml_collections.ConfigDict(dict(steps=250, learning_rate=1e-3, kl_weight=1e-4))
  # text_learning_rate 0: the text encoder stays as initialised. Trained jointly (3e-4), it collapsed
  # to nearly one state for every prompt and the UNet ignored the text (13% prompt accuracy, issue 16).
  c.unet = ml_collections.ConfigDict(dict(steps=1200, learning_rate=1e-3, text_learning_rate=0.0,
                                          caption_dropout=0.1))
  # A CLIP checkpoint or clip_jax workdir whose text tower (minus its projection) initialises the
  # text encoder, which then takes that tower's shape; '' = a random 32-wide encoder. The default,
  # the README's digits CLIP, is trained first when absent (~80 s).
  c.text_init = DIGITS_CLIP
  # The samples after training: per_prompt images of each "a {digit}" prompt, judged by the
  # independent digit classifier (prompt accuracy, in pretrain.json); the sheet shows sheet_columns
  # of them. Sampler, steps and guidance are Table 3's (configs/dreambooth/digits.py).
  c.sample = ml_collections.ConfigDict(dict(steps=25, guidance_scale=3.0, sampler="dpm++2m", per_prompt=16,
                                            sheet_columns=4))
  c.log_every = 25
  c.checkpoint_every = 500
  return c


# ----------------------------------------------------------------------------- data
def load_digits(image_size: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """float32 images [n, s, s, 3] in [-1, 1] and int labels [n] of the embedded digits."""
  source = digits_lib.DigitsSource(split, image_size=image_size)
  images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32) / 127.5 - 1.0
  return images, np.asarray(source.labels)


def caption_table() -> list[list[str]]:
  """Per label, every caption a training image of that digit may get."""
  return [digits_lib.captions_for(label) + [t.format(name=name, digit=label) for t in EXTRA_TEMPLATES]
          for label, name in enumerate(digits_lib.CLASS_NAMES)]


def batch_indices(num: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """A pure function of (seed, step), so a stage is reproducible batch for batch."""
  return np.random.default_rng([seed, step]).integers(0, num, batch_size)


# ----------------------------------------------------------------------------- stage 1: the VAE
def vae_loss(vae: AutoencoderKL, params, pixels: jax.Array, rng: jax.Array, kl_weight: float):
  """L1 + L2 reconstruction of a posterior sample, plus kl_weight * KL(q(z|x) || N(0, I)) per latent."""
  mean, logvar = vae.apply({"params": params}, pixels, method="encode")
  recon = vae.apply({"params": params}, sample_posterior(rng, mean, logvar), method="decode")
  l1 = jnp.mean(jnp.abs(recon - pixels))
  l2 = jnp.mean(jnp.square(recon - pixels))
  kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return l1 + l2 + kl_weight * kl, {"l1": l1, "l2": l2, "kl": kl}


def recolour(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Dark-on-white digits [n, s, s, 3] in [-1, 1] redrawn with a random ink colour on a random light
  paper. The VAE sees colours so that, like SD's VAE, it can encode images beyond what the UNet is
  trained on (the UNet only ever sees grey digits): a coloured subject is then a gap in the
  diffusion model, not in the autoencoder."""
  ink = (1.0 - images[..., :1]) / 2.0  # [n, s, s, 1] in [0, 1]
  ink_colour = rng.uniform(0.0, 1.0, (len(images), 1, 1, 3))
  paper = rng.uniform(0.7, 1.0, (len(images), 1, 1, 3))
  return ((paper * (1.0 - ink) + ink_colour * ink) * 2.0 - 1.0).astype(np.float32)


def run_stage(cfg, workdir: str, trainable: dict[str, Any], tx, update, next_batch, total_steps: int, progress: bool,
              args=()) -> dict[str, Any]:
  """One stage on the shared loop, everything replicated on a mesh over all devices (the model is
  tiny); the batch is split over the devices when it divides evenly. Returns the trained params."""
  mesh = sharding.create_mesh({"data": -1})
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {**loop.init_counters(), "params": trainable, "opt_state": tx.init(trainable)}
  state_shardings = jax.tree.map(lambda _: replicated, state)
  state = sharding.put_global(state, state_shardings)
  split = sharding.splits_evenly(cfg.batch_size, mesh)
  args = tuple(sharding.put_global(a, jax.tree.map(lambda _: replicated, a)) for a in args)
  options = loop.Options(total_steps=total_steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                         keep_checkpoints=1, progress_bar=progress)
  result = loop.run(workdir=workdir, mesh=mesh, state=state, state_shardings=state_shardings, update=update,
                    next_batch=lambda step: sharding.place_global_batch(next_batch(step), mesh, split),
                    options=options, args=args, examples_per_step=cfg.batch_size, desc=os.path.basename(workdir))
  # Saved (SIGTERM, Ctrl-C): the command exits 75 and the same command resumes. Also when the stop
  # came during this stage's last step: the next stage (or the export) must not start after it.
  if result.stop_requested:
    raise SystemExit(loop.EXIT_PREEMPTED)
  return jax.device_get(result.state["params"])


def train_vae(cfg, vae: AutoencoderKL, params, images: np.ndarray, workdir: str, progress: bool):
  tx = optax.adam(optax.cosine_decay_schedule(cfg.vae.learning_rate, max(cfg.vae.steps, 1), 0.1))

  def update(state, batch):
    (loss, parts), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
        vae, state["params"], batch["pixels"], jax.random.key(state["step"]), cfg.vae.kl_weight)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return (dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state),
            {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts})

  def next_batch(step):
    pixels = images[batch_indices(len(images), cfg.batch_size, cfg.seed, step)]
    # Half of each batch recoloured, half as the UNet will see them.
    coloured = recolour(pixels, np.random.default_rng([cfg.seed, 2, step]))
    return {"pixels": np.where(np.arange(len(pixels))[:, None, None, None] % 2 == 1, coloured, pixels)}

  return run_stage(cfg, os.path.join(workdir, "vae"), params, tx, update, next_batch, cfg.vae.steps, progress)


def latent_scaling_factor(vae: AutoencoderKL, params, images: np.ndarray, seed: int) -> float:
  """1 / std of posterior samples over (up to) 512 images: scaled latents have unit variance."""
  pixels = jnp.asarray(images[:512])
  mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, pixels)
  latents = sample_posterior(jax.random.key(seed), mean, logvar)
  return float(1.0 / (jnp.std(latents) + 1e-6))


# ----------------------------------------------------------------------------- stage 2: UNet + text
def train_unet(cfg, pipe: sd.StableDiffusion, images: np.ndarray, labels: np.ndarray, workdir: str,
               progress: bool) -> dict[str, Any]:
  """Trains pipe.params['unet'] and ['text_encoder'] (VAE frozen); returns the new params."""
  captions = caption_table()
  # Tokenize every caption once: a batch then only gathers rows. [num_captions, context_length]
  flat = [c for per_label in captions for c in per_label]
  offsets = np.cumsum([0] + [len(c) for c in captions])
  all_tokens = sd.tokenize(pipe, flat + [""])
  empty_row = len(flat)

  # DreamBooth's loss with every row an instance row with its own caption: plain epsilon MSE.
  loss_fn = db_train.make_loss_fn(pipe, schedulers.NoiseSchedule.from_config(pipe.scheduler_config),
                                  num_instance=cfg.batch_size, params_fn=lambda frozen, trained: {**frozen, **trained},
                                  prior_weight=0.0)
  # text_learning_rate 0 freezes the text encoder (no gradient is computed for it).
  train_text = cfg.unet.text_learning_rate > 0
  trainable = {"unet": pipe.params["unet"], **({"text_encoder": pipe.params["text_encoder"]} if train_text else {})}
  frozen = {"vae": pipe.params["vae"], **({} if train_text else {"text_encoder": pipe.params["text_encoder"]})}
  total = max(cfg.unet.steps, 1)
  groups = {"unet": optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.unet.learning_rate, min(100, total // 10),
                                                                   total, cfg.unet.learning_rate * 0.05),
                                weight_decay=1e-2, mask=optim.decay_mask)}
  if train_text:
    groups["text_encoder"] = optax.adamw(optax.cosine_decay_schedule(cfg.unet.text_learning_rate, total, 0.05),
                                         weight_decay=1e-2, mask=optim.decay_mask)
  labels_tree = {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in trainable.items()}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(groups, labels_tree))

  def update(state, batch, frozen):
    row_keys = jax.random.split(jax.random.key(cfg.seed * 100_003 + state["step"]), cfg.batch_size)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch["pixels"],
                                                                 batch["tokens"], row_keys)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return (dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state),
            {"loss": loss, "grad_norm": optax.tree.norm(grads)})

  def next_batch(step):
    rng = np.random.default_rng([cfg.seed, 1, step])
    picks = rng.integers(0, len(images), cfg.batch_size)
    rows = np.array([offsets[labels[i]] + rng.integers(0, len(captions[labels[i]])) for i in picks])
    rows = np.where(rng.random(cfg.batch_size) < cfg.unet.caption_dropout, empty_row, rows)
    return {"pixels": images[picks], "tokens": all_tokens[rows]}

  trained = run_stage(cfg, os.path.join(workdir, "unet"), trainable, tx, update, next_batch, cfg.unet.steps,
                      progress, args=(frozen,))
  return dict(pipe.params, **trained)


# ----------------------------------------------------------------------------- the text encoder's init
def clip_text_tower(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(tiny_configs keyword arguments, text-encoder params) from a CLIP's text tower.

  path: what `clip_jax.convert.load_checkpoint` reads (a clip_jax workdir such as the README's
  `workdirs/digits`, a checkpoint file or HF folder). The tower's params are the text encoder's
  (`TextTransformer` with output_dim=None) less `text_projection`, which SD's encoder lacks: SD
  conditions on every token's last hidden state after the final LayerNorm, not on the projection.
  ValueError for a tower whose MLP is not 4x wide (the tiny config's ratio).
  """
  from clip_jax.convert import load_checkpoint
  model, variables = load_checkpoint(path)
  text = model.config.text
  if text.mlp_ratio != 4.0:
    raise ValueError(f"text_init {path}: the text tower's MLP ratio is {text.mlp_ratio}; the tiny SD's encoder uses 4.")
  params = {k: v for k, v in variables["params"]["text"].items() if k != "text_projection"}
  kwargs = dict(text_width=text.width, context_length=text.context_length, text_layers=text.layers,
                text_heads=text.heads, text_act=model.config.act)
  return kwargs, jax.device_get(params)


def ensure_digits_clip(path: str = DIGITS_CLIP) -> str:
  """`path`, after training the digits CLIP there with the README's first command (~80 s on 2 cores;
  `python -m clip_jax.train --config=configs/clip/digits.py`) when nothing is there yet, or resuming
  it when its run is unfinished (`clip_jax.child_runs.ensure_trained`)."""
  from clip_jax.child_runs import ensure_trained
  ensure_trained(path, "configs/clip/digits.py")
  return path


def cpu_seconds() -> float:
  """User + system CPU time of this process so far (all threads): the pretraining budget's measure
  that does not depend on what else the machine runs."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def sample_and_judge(pipe: sd.StableDiffusion, params, sample_cfg, seed: int,
                     digits=tuple(range(10))) -> tuple[np.ndarray, dict]:
  """Images uint8 [len(digits) * per_prompt, s, s, 3] for "a {digit}" (SAMPLE_PROMPTS; prompt-major)
  and their prompt accuracy by the independent digit classifier (`digit_classifier.accuracy_by_digit`)."""
  images = sd.generate(pipe, params, [SAMPLE_PROMPTS[d] for d in digits], num_steps=sample_cfg.steps,
                       guidance_scale=sample_cfg.guidance_scale, sampler=sample_cfg.sampler,
                       rng=jax.random.key(seed), num_images_per_prompt=sample_cfg.per_prompt)
  return images, digit_classifier.accuracy_by_digit(images, np.repeat(np.asarray(digits), sample_cfg.per_prompt))


# ----------------------------------------------------------------------------- the whole run
def pretrain(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True,
             allow_config_change: bool = False) -> dict[str, Any]:
  """Trains the base model into `<workdir>/export`; returns paths and the final losses.

  Resuming a workdir whose vae/ or unet/ stage holds a checkpoint with settings that change the
  maths raises clip_jax.cli.UserError naming them, unless `allow_config_change` (then recorded)."""
  if cfg.image_size % 4:
    raise ValueError(f"image_size must be a multiple of 4 (the tiny VAE's downscale), got {cfg.image_size}.")
  summary_path = os.path.join(workdir, "pretrain.json")
  total_steps = cfg.vae.steps + cfg.unet.steps
  if loop.check_workdir(workdir, cfg, total_steps=total_steps, allow_config_change=allow_config_change,
                       offers_rerun_eval=False) \
      and os.path.exists(summary_path):
    with open(summary_path) as f:  # finished: said so; every file stays as it is
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  start, cpu_start, load_start = time.time(), cpu_seconds(), os.getloadavg()[0]
  images, labels = load_digits(cfg.image_size)
  digits = tuple(int(d) for d in cfg.digits)
  if not digits or not set(digits) <= set(range(len(SAMPLE_PROMPTS))):
    raise ValueError(f"digits must be some of 0..9, got {cfg.digits}.")
  keep = np.isin(labels, digits)
  images, labels = images[keep], labels[keep]
  prompts = [SAMPLE_PROMPTS[d] for d in digits]
  if cfg.text_init == DIGITS_CLIP:
    ensure_digits_clip(cfg.text_init)
  text_kwargs, text_params = clip_text_tower(cfg.text_init) if cfg.text_init else ({}, None)
  pipe = make_tiny_pipeline(jax.random.key(cfg.seed), image_size=cfg.image_size, **text_kwargs)
  if text_params is not None:
    pipe.params = dict(pipe.params, text_encoder=text_params)
  pipe.vae_scaling_factor = 1.0  # measured after stage 1
  print(f"Pretraining a tiny Stable Diffusion on {len(images)} digits ({cfg.image_size} px) in {workdir}",
        flush=True)

  vae_params = train_vae(cfg, pipe.vae, pipe.params["vae"], images, workdir, progress)
  scaling = latent_scaling_factor(pipe.vae, vae_params, images, cfg.seed)
  pipe.vae = pipe.vae.clone(config=dataclasses.replace(pipe.vae.config, scaling_factor=scaling))
  pipe.vae_scaling_factor = scaling
  pipe.params = dict(pipe.params, vae=vae_params)
  vae_seconds, vae_cpu = time.time() - start, cpu_seconds() - cpu_start

  pipe.params = train_unet(cfg, pipe, images, labels, workdir, progress)
  export_dir = sd.save_pipeline(pipe, os.path.join(workdir, "export"))
  train_seconds, train_cpu = time.time() - start, cpu_seconds() - cpu_start

  samples, accuracy = sample_and_judge(pipe, pipe.params, cfg.sample, cfg.seed + 7, digits)
  print(f"Prompt accuracy (digit classifier, {cfg.sample.per_prompt} images per prompt): "
        f"{100 * accuracy['overall']:.1f}%", flush=True)
  # A row per prompt (its first sheet_columns images), the prompt written above it.
  columns = min(cfg.sample.sheet_columns, cfg.sample.per_prompt)
  sheet = samples.reshape(len(digits), cfg.sample.per_prompt, *samples.shape[1:])[:, :columns]
  grid = db_train.save_grid(sheet.reshape(-1, *samples.shape[1:]), os.path.join(workdir, "samples.png"),
                            columns=columns, labels=prompts,
                            title=f"tiny SD after {cfg.unet.steps} UNet steps: {cfg.sample.sampler} {cfg.sample.steps} "
                                  f"steps, guidance {cfg.sample.guidance_scale}, seed {cfg.seed + 7}; prompt "
                                  f"accuracy {100 * accuracy['overall']:.0f}%")
  final = {f"{stage}/{k}": round(v, 5) for stage in ("vae", "unet")
           for r in read_metrics(os.path.join(workdir, stage, "metrics.jsonl")) for k, v in r.items() if k != "step"}
  # Seconds of wall time and of CPU time (this process, all threads): on a shared machine the CPU
  # time, not the wall time, says what the run costs; the load average says how shared it was.
  summary = {"export_dir": export_dir, "samples": grid, "vae_scaling_factor": scaling,
             "vae_seconds": round(vae_seconds, 1), "train_seconds": round(train_seconds, 1),
             "seconds": round(time.time() - start, 1), "vae_cpu_seconds": round(vae_cpu, 1),
             "train_cpu_seconds": round(train_cpu, 1), "cpu_count": os.cpu_count(),
             "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
             "final_metrics": final, "sample_prompts": prompts,
             "prompt_accuracy": accuracy, "prompt_accuracy_settings": cfg.sample.to_dict(),
             "text_init": cfg.text_init}
  text = json.dumps(summary, indent=2) + "\n"
  write_atomic(summary_path, text)
  loop.mark_finished(workdir, total_steps, [summary_path, export_dir, grid])
  return json.loads(text)  # as a finished workdir returns it (JSON keys are strings)


def is_pretrained(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "export", "model_index.json"))


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m dreambooth_jax.embedded.pretrain",
      description="Train the embedded tiny Stable Diffusion (VAE, then UNet + text encoder) on the "
                  "captioned digits that ship with scikit-learn; writes a diffusers folder to WORKDIR/export.")
  parser.add_argument("--workdir", required=True, help="output folder (export/, samples.png, metrics)")
  defaults = get_config()
  parser.add_argument("--vae_steps", type=int, default=defaults.vae.steps)
  parser.add_argument("--unet_steps", type=int, default=defaults.unet.steps)
  parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--text_init", default=defaults.text_init,
                      help="a CLIP (e.g. the README's workdirs/digits) whose text tower initialises the text encoder; "
                           "'' for a random one")
  parser.add_argument("--unet_learning_rate", type=float, default=defaults.unet.learning_rate)
  parser.add_argument("--text_learning_rate", type=float, default=defaults.unet.text_learning_rate)
  parser.add_argument("--caption_dropout", type=float, default=defaults.unet.caption_dropout,
                      help="share of captions replaced by '' (classifier-free guidance's unconditional rows)")
  parser.add_argument("--allow-config-change", action="store_true",
                      help="resume a workdir trained with other settings (the change is recorded in config_changes.jsonl)")
  args = parser.parse_args(argv)
  if min(args.vae_steps, args.unet_steps) < 1 or args.batch_size < 1:
    parser.error("--vae_steps, --unet_steps and --batch_size must be at least 1.")
  if not 0.0 <= args.caption_dropout < 1.0:
    parser.error("--caption_dropout must be in [0, 1).")
  if args.text_init and args.text_init != DIGITS_CLIP and not os.path.exists(args.text_init):
    from clip_jax.cli import MissingPathError
    raise MissingPathError(f"--text_init {args.text_init}: no such file or directory (the digits CLIP: "
                           "python -m clip_jax.train --config=configs/clip/digits.py --workdir=workdirs/digits).")
  cfg = get_config()
  cfg.vae.steps, cfg.unet.steps, cfg.batch_size, cfg.seed = args.vae_steps, args.unet_steps, args.batch_size, args.seed
  cfg.text_init = args.text_init
  cfg.unet.learning_rate, cfg.unet.text_learning_rate = args.unet_learning_rate, args.text_learning_rate
  cfg.unet.caption_dropout = args.caption_dropout
  summary = pretrain(cfg, args.workdir, allow_config_change=args.allow_config_change)
  subject = ensure_subject(os.path.join(args.workdir, "subject"), cfg.image_size)
  # The whole summary (timings, final losses, which digit each prompt's samples read as) is in
  # pretrain.json; here what says whether the model draws the digits it is asked for.
  metrics = summary["final_metrics"]
  print(f"Summary: {os.path.join(args.workdir, 'pretrain.json')}; final loss VAE {metrics['vae/loss']:.4f}, "
        f"UNet {metrics['unet/loss']:.4f}; prompt accuracy {float(summary['prompt_accuracy']['overall']):.1%} "
        "(samples of 'a zero' ... 'a nine' the digit classifier reads as the digit asked for; chance 10%)")
  from clip_jax import cli
  red_seven = os.path.join(os.path.dirname(os.path.normpath(args.workdir)), "red_seven")
  print(f"Base model: {summary['export_dir']}\nSamples ('a zero' ... 'a nine'): {summary['samples']}\n"
        f"A subject to try DreamBooth on (4 images of one held-out seven in red ink, the subject of the "
        f"embedded Table 3): {subject}\n  "
        + cli.python_command("dreambooth_jax.train", "--config=configs/dreambooth/digits.py:text",
                             f"--workdir={red_seven}", f"--config.pretrained_model={summary['export_dir']}",
                             f"--config.instance_dir={subject}"), flush=True)


def ensure_subject(directory: str, image_size: int) -> str:
  """Writes Table 3's subject (`table3.subject_images`: 4 PNGs of one held-out handwritten seven in
  red ink) to `directory` unless it holds them already; returns `directory`. Not part of the base
  model: a finished pretraining workdir gains it too."""
  from dreambooth_jax.embedded import table3  # table3 imports this module
  if not all(os.path.isfile(path) for path in table3.subject_paths(directory)):
    table3.write_subject(directory, table3.subject_images(image_size))
  return directory


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
