"""StyleCLIP's three text-driven edits (Patashnik et al. 2021, arXiv 2103.17249) on any generator.

The generator is a function `latents [n, ...] -> images [n, h, w, 3] in [0, 1]` (StyleGAN's
synthesis network in the paper; Stable Diffusion's VAE decoder in `dreambooth_jax.edit`), and the
CLIP objective a function `(images, rng) -> per-image loss [n]` (a bound `clip_jax.guidance` loss,
-cos to the target text, so 1 + loss is the paper's D_CLIP = 1 - cos).

1. Latent optimisation (paper Sec. 4): argmin_w D_CLIP(G(w), t) + lambda_L2 ||w - w_s||^2
   + lambda_ID (1 - <E(G(w)), E(G(w_s))>) with E an identity / similarity embedder when given
   (ArcFace in the paper). Settings from the authors' code (run_optimization.py): 300 steps, Adam at
   0.1 with their learning-rate ramp (up over the first 5%, cosine down over the last 25%),
   lambda_L2 = 0.008 on the summed squared difference, lambda_ID = 0.005.
2. Latent mapper (Sec. 5): a small MLP M trained for one text over many latents, w -> w + 0.1 M(w)
   (the authors' 0.1 scale and PixelNorm input), loss D_CLIP + lambda_L2 ||0.1 M(w)||^2 (mean
   squared, 0.8 in the paper) + lambda_ID. Ours: one MLP over the flattened latent instead of three
   (coarse / medium / fine StyleGAN levels, which a generic latent does not have); Adam instead of
   their Ranger.
3. Global direction (Sec. 6): Delta t = normalise(t_target - t_neutral) in CLIP's text space; each
   latent coordinate c gets the CLIP image-space direction Delta i_c its change produces, averaged
   over sample latents; relevance R_c = <Delta i_c / |Delta i_c|, Delta t>; coordinates with
   |R_c| < beta are zeroed (disentanglement threshold) and the edit is w + alpha * R * sigma / max|R|
   (sigma: the coordinate's spread over the samples). Ours: Delta i_c is the exact derivative
   (a column of the Jacobian of the normalised CLIP embedding, scaled by sigma_c) instead of the
   paper's finite +-perturbation of each StyleSpace channel, and the coordinates are the latent's
   own (the paper's StyleSpace channels belong to StyleGAN).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.models.clip import l2_normalize

Generator = Callable[[jax.Array], jax.Array]            # latents [n, ...] -> images [n, h, w, 3] in [0, 1]
ClipLoss = Callable[[jax.Array, jax.Array], jax.Array]  # (images, rng) -> losses [n]; -cos to the target
Embedder = Callable[[jax.Array], jax.Array]             # images -> features [n, e] (normalised here)


def _sum_sq(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)


def identity_loss(embedder: Embedder, images: jax.Array, source_images: jax.Array) -> jax.Array:
  """1 - cos(E(edited), E(source)) per image [n]."""
  a = l2_normalize(embedder(images).reshape(images.shape[0], -1))
  b = l2_normalize(embedder(source_images).reshape(images.shape[0], -1))
  return 1.0 - jnp.sum(a * b, axis=-1)


def check_latents(latents: jax.Array, what: str = "latents") -> None:
  if latents.ndim < 2 or latents.shape[0] < 1:
    raise ValueError(f"{what} must be [n, ...] with n >= 1, got shape {tuple(latents.shape)}.")


# ----------------------------------------------------------------------------- 1. latent optimisation
@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
  steps: int = 300
  learning_rate: float = 0.1
  l2_weight: float = 0.008       # lambda_L2, on the summed squared difference
  id_weight: float = 0.005       # lambda_ID, used only when an embedder is given
  rampup: float = 0.05           # the authors' lr ramp: up over this fraction ...
  rampdown: float = 0.25         # ... and cosine down over this last fraction


def stylegan_lr(step: jax.Array, s: OptimizeSettings) -> jax.Array:
  """The learning rate of StyleCLIP's (and StyleGAN2 projection's) optimisation at `step`."""
  t = step / s.steps
  ramp = jnp.minimum(1.0, (1.0 - t) / s.rampdown)
  ramp = 0.5 - 0.5 * jnp.cos(ramp * jnp.pi)
  return s.learning_rate * ramp * jnp.minimum(1.0, t / s.rampup)


def optimize_latents(generator: Generator, clip_loss: ClipLoss, w_source: jax.Array, rng: jax.Array,
                     settings: OptimizeSettings = OptimizeSettings(), embedder: Embedder | None = None):
  """StyleCLIP latent optimisation from `w_source` [n, ...] (each row its own problem). Returns
  (w [n, ...], history {'clip' [steps, n] (1 - cos), 'l2' [steps, n] (summed squared distance)})."""
  check_latents(w_source, "source latents")
  source_images = generator(w_source)
  tx = optax.adam(lambda step: stylegan_lr(step, settings))
  id_weight = settings.id_weight if embedder is not None else 0.0

  def loss(w, key):
    images = generator(w)
    clip = 1.0 + clip_loss(images, key)
    l2 = _sum_sq(w - w_source)
    total = clip + settings.l2_weight * l2
    if id_weight:
      total = total + id_weight * identity_loss(embedder, images, source_images)
    return jnp.sum(total), (clip, l2)

  def step_fn(carry, key):
    w, opt_state = carry
    (_, (clip, l2)), grad = jax.value_and_grad(loss, has_aux=True)(w, key)
    updates, opt_state = tx.update(grad, opt_state, w)
    return (optax.apply_updates(w, updates), opt_state), {"clip": clip, "l2": l2}

  run = jax.jit(lambda w, keys: jax.lax.scan(step_fn, (w, tx.init(w)), keys))
  (w, _), history = run(w_source, jax.random.split(rng, settings.steps))
  return w, history


# ----------------------------------------------------------------------------- 2. latent mapper
class LatentMapper(nn.Module):
  """w [n, ...] -> residual [n, ...]: PixelNorm, `layers` Dense + leaky ReLU, a Dense back out."""
  latent_size: int
  hidden: int = 512
  layers: int = 4

  @nn.compact
  def __call__(self, w: jax.Array) -> jax.Array:
    x = w.reshape(w.shape[0], -1)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-8)  # StyleGAN's PixelNorm
    for _ in range(self.layers):
      x = nn.leaky_relu(nn.Dense(self.hidden)(x), 0.2)
    return nn.Dense(self.latent_size)(x).reshape(w.shape)


MAPPER_SCALE = 0.1  # w_hat = w + 0.1 * M(w), as the authors' mapper code


@dataclasses.dataclass(frozen=True)
class MapperSettings:
  steps: int = 2000
  batch_size: int = 8
  learning_rate: float = 1e-3
  l2_weight: float = 0.8         # lambda_L2 (paper), on the mean squared residual
  id_weight: float = 0.1         # lambda_ID (paper), used only when an embedder is given
  hidden: int = 512
  layers: int = 4


def apply_mapper(mapper: LatentMapper, params, w: jax.Array) -> jax.Array:
  """The mapped latents w + 0.1 * M(w)."""
  return w + MAPPER_SCALE * mapper.apply({"params": params}, w)


def train_mapper(generator: Generator, clip_loss: ClipLoss, train_latents: jax.Array, rng: jax.Array,
                 settings: MapperSettings = MapperSettings(), embedder: Embedder | None = None):
  """Trains a mapper for one text on `train_latents` [N, ...] (batches drawn with replacement).
  Returns (mapper, params, history {'clip' [steps] mean 1 - cos, 'l2' [steps] mean squared residual})."""
  check_latents(train_latents, "training latents")
  mapper = LatentMapper(int(np.prod(train_latents.shape[1:])), settings.hidden, settings.layers)
  init_rng, loop_rng = jax.random.split(rng)
  params = mapper.init(init_rng, train_latents[:1])["params"]
  tx = optax.adam(settings.learning_rate)
  id_weight = settings.id_weight if embedder is not None else 0.0

  def loss(params, w, key):
    residual = MAPPER_SCALE * mapper.apply({"params": params}, w)
    images = generator(w + residual)
    clip = jnp.mean(1.0 + clip_loss(images, key))
    l2 = jnp.mean(jnp.square(residual))
    total = clip + settings.l2_weight * l2
    if id_weight:
      total = total + id_weight * jnp.mean(identity_loss(embedder, images, generator(w)))
    return total, (clip, l2)

  def step_fn(carry, key):
    params, opt_state = carry
    pick_key, loss_key = jax.random.split(key)
    w = train_latents[jax.random.randint(pick_key, (settings.batch_size,), 0, train_latents.shape[0])]
    (_, (clip, l2)), grad = jax.value_and_grad(loss, has_aux=True)(params, w, loss_key)
    updates, opt_state = tx.update(grad, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"clip": clip, "l2": l2}

  run = jax.jit(lambda params, keys: jax.lax.scan(step_fn, (params, tx.init(params)), keys))
  (params, _), history = run(params, jax.random.split(loop_rng, settings.steps))
  return mapper, params, history


# ----------------------------------------------------------------------------- 3. global direction
def text_direction(neutral_emb: jax.Array, target_emb: jax.Array) -> jax.Array:
  """Delta t = normalise(t_target - t_neutral) [d]; each input [d] or a prompt ensemble [m, d] (averaged)."""
  mean = lambda e: l2_normalize(jnp.mean(e.reshape(-1, e.shape[-1]), axis=0))  # noqa: E731
  return l2_normalize(mean(target_emb) - mean(neutral_emb))


def coordinate_directions(generator: Generator, image_embed: Callable[[jax.Array], jax.Array],
                          sample_latents: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Delta i [latent..., d]: each latent coordinate's CLIP image-space direction, the Jacobian
  column of the normalised embedding times the coordinate's spread, averaged over the samples;
  sigma [latent...]: that spread). image_embed: images -> normalised CLIP embeddings [n, d]."""
  check_latents(sample_latents, "sample latents")
  sigma = jnp.std(sample_latents, axis=0) + 1e-6
  embed_one = lambda w: image_embed(generator(w[None]))[0]  # noqa: E731
  jacobians = jax.lax.map(jax.jacrev(embed_one), sample_latents)  # [N, d, latent...]
  delta = jnp.mean(jacobians, axis=0) * sigma                      # [d, latent...]
  return jnp.moveaxis(delta, 0, -1), sigma


def global_direction(delta_i: jax.Array, sigma: jax.Array, delta_t: jax.Array, beta: float) -> jax.Array:
  """The edit direction [latent...] (max |.| = max sigma-scaled relevance, 0 below beta): coordinates
  whose normalised image direction agrees with Delta t by |R_c| >= beta, R_c = <Delta i_c, Delta t>.
  Raises ValueError when beta leaves no coordinate (the message names the largest |R|)."""
  relevance = jnp.einsum("...d,d->...", l2_normalize(delta_i), delta_t)
  largest = float(jnp.max(jnp.abs(relevance)))
  if largest < beta:
    raise ValueError(f"beta={beta} keeps no latent coordinate (the largest relevance is {largest:.3f}); "
                     "lower beta.")
  kept = jnp.where(jnp.abs(relevance) >= beta, relevance, 0.0)
  return kept / largest * sigma


def apply_direction(w: jax.Array, direction: jax.Array, alpha: float) -> jax.Array:
  """w + alpha * direction (alpha: the edit strength, its sign the edit's sense)."""
  return w + alpha * direction


def summary(values: Any) -> dict[str, float]:
  """Mean of each history entry's first and last step, for reports."""
  return {k: [float(np.mean(np.asarray(v)[0])), float(np.mean(np.asarray(v)[-1]))] for k, v in values.items()}
