r"""The embedded base model: a tiny Stable Diffusion (the real UNet, VAE and clip_jax text encoder)
trained from scratch on the captioned handwritten digits that ship with scikit-learn.

    python -m dreambooth_jax.embedded.pretrain --workdir runs/digits_sd [--vae_steps 250 --unet_steps 1200]

Two stages, as Stable Diffusion was built: (1) the VAE learns to reconstruct the 32 px digits
(L1 + L2 + a small KL), then its latent scale is measured so that scaled latents have unit
variance (SD's `scaling_factor`); (2) with the VAE frozen, the UNet and the text encoder learn
text-to-image with DreamBooth's own epsilon-prediction loss (`train.make_loss_fn`, every row an
"instance" row with its own caption). 10% of captions are dropped to "" so that classifier-free
guidance works at sampling time. The result is a diffusers-format folder (`<workdir>/export`)
that `python -m dreambooth_jax.train` fine-tunes, and a grid of samples (`<workdir>/samples.png`).
Each stage runs on the shared training loop (`clip_jax.loop`) in its own folder (`<workdir>/vae`,
`<workdir>/unet`: checkpoints, metrics, loss plot), so an interrupted pretraining resumes.

Why the text encoder trains jointly: it starts from random weights here, and a random encoder
gives "7", "seven" and "a handwritten seven." unrelated states; training it lets the captions'
phrasings agree. Tokens never seen in the captions (DreamBooth's rare identifier) keep their
random embeddings, as a rare token of a real checkpoint carries little meaning.
"""
from __future__ import annotations

import dataclasses
import json
import os
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
from dreambooth_jax.models.vae import AutoencoderKL, sample_posterior

# The class prompt of DreamBooth is "a {name}"; the digits' own templates never say it that plainly,
# so it joins them here (otherwise "a seven" would be off the captions' distribution).
EXTRA_TEMPLATES = ("a {name}",)
SAMPLE_PROMPTS = tuple(f"a {name}" for name in digits_lib.CLASS_NAMES)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 32
  c.batch_size = 32
  c.vae = ml_collections.ConfigDict(dict(steps=250, learning_rate=1e-3, kl_weight=1e-4))
  c.unet = ml_collections.ConfigDict(dict(steps=1200, learning_rate=1e-3, text_learning_rate=3e-4,
                                          caption_dropout=0.1))
  c.sample = ml_collections.ConfigDict(dict(steps=20, guidance_scale=3.0, sampler="dpm++2m", per_prompt=2))
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
  if result.preempted:  # saved (SIGTERM, Ctrl-C): the command exits 75 and the same command resumes
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
  trainable = {"unet": pipe.params["unet"], "text_encoder": pipe.params["text_encoder"]}
  frozen = {"vae": pipe.params["vae"]}
  total = max(cfg.unet.steps, 1)
  groups = {"unet": optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.unet.learning_rate, min(100, total // 10),
                                                                   total, cfg.unet.learning_rate * 0.05),
                                weight_decay=1e-2, mask=optim.decay_mask),
            "text_encoder": optax.adamw(optax.cosine_decay_schedule(cfg.unet.text_learning_rate, total, 0.05),
                                        weight_decay=1e-2, mask=optim.decay_mask)}
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


# ----------------------------------------------------------------------------- the whole run
def pretrain(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict[str, Any]:
  """Trains the base model into `<workdir>/export`; returns paths and the final losses."""
  if cfg.image_size % 4:
    raise ValueError(f"image_size must be a multiple of 4 (the tiny VAE's downscale), got {cfg.image_size}.")
  summary_path = os.path.join(workdir, "pretrain.json")
  total_steps = cfg.vae.steps + cfg.unet.steps
  if loop.check_workdir(workdir, cfg, total_steps=total_steps) and os.path.exists(summary_path):
    with open(summary_path) as f:  # finished: said so; every file stays as it is
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  images, labels = load_digits(cfg.image_size)
  pipe = make_tiny_pipeline(jax.random.key(cfg.seed), image_size=cfg.image_size)
  pipe.vae_scaling_factor = 1.0  # measured after stage 1
  print(f"Pretraining a tiny Stable Diffusion on {len(images)} digits ({cfg.image_size} px) in {workdir}",
        flush=True)

  vae_params = train_vae(cfg, pipe.vae, pipe.params["vae"], images, workdir, progress)
  scaling = latent_scaling_factor(pipe.vae, vae_params, images, cfg.seed)
  pipe.vae = pipe.vae.clone(config=dataclasses.replace(pipe.vae.config, scaling_factor=scaling))
  pipe.vae_scaling_factor = scaling
  pipe.params = dict(pipe.params, vae=vae_params)
  vae_seconds = time.time() - start

  pipe.params = train_unet(cfg, pipe, images, labels, workdir, progress)
  export_dir = sd.save_pipeline(pipe, os.path.join(workdir, "export"))

  samples = sd.generate(pipe, pipe.params, list(SAMPLE_PROMPTS), num_steps=cfg.sample.steps,
                        guidance_scale=cfg.sample.guidance_scale, sampler=cfg.sample.sampler,
                        rng=jax.random.key(cfg.seed + 7), num_images_per_prompt=cfg.sample.per_prompt)
  # A row per prompt (images in prompt order), the prompt written above it.
  grid = db_train.save_grid(samples, os.path.join(workdir, "samples.png"), columns=cfg.sample.per_prompt,
                            labels=list(SAMPLE_PROMPTS),
                            title=f"tiny SD after {cfg.unet.steps} UNet steps: {cfg.sample.sampler} {cfg.sample.steps} "
                                  f"steps, guidance {cfg.sample.guidance_scale}, seed {cfg.seed + 7}")
  final = {f"{stage}/{k}": round(v, 5) for stage in ("vae", "unet")
           for r in read_metrics(os.path.join(workdir, stage, "metrics.jsonl")) for k, v in r.items() if k != "step"}
  summary = {"export_dir": export_dir, "samples": grid, "vae_scaling_factor": scaling,
             "vae_seconds": round(vae_seconds, 1), "seconds": round(time.time() - start, 1),
             "final_metrics": final, "sample_prompts": list(SAMPLE_PROMPTS)}
  write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
  loop.mark_finished(workdir, total_steps, [summary_path, export_dir, grid])
  return summary


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
  args = parser.parse_args(argv)
  if min(args.vae_steps, args.unet_steps) < 1 or args.batch_size < 1:
    parser.error("--vae_steps, --unet_steps and --batch_size must be at least 1.")
  cfg = get_config()
  cfg.vae.steps, cfg.unet.steps, cfg.batch_size, cfg.seed = args.vae_steps, args.unet_steps, args.batch_size, args.seed
  summary = pretrain(cfg, args.workdir)
  print(json.dumps(summary, indent=2))
  print(f"Base model: {summary['export_dir']}\nSamples ('a zero' ... 'a nine'): {summary['samples']}", flush=True)


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
