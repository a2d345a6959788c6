"""Diffusion noise schedules, training targets and samplers, defined by a diffusers scheduler config.

A checkpoint's `scheduler/scheduler_config.json` decides the betas, what the UNet predicts
(epsilon, v or x0) and how inference timesteps are spaced. Everything here is read from that dict,
so a v-prediction checkpoint trains on the v target and samples with the v conversion.

Two halves:
  * training: `add_noise`, `training_target`, `snr`, `min_snr_loss_weight`, `offset_noise`;
  * sampling: `sample(kind, schedule, denoise_fn, latents_init, num_steps, rng)` for a sampler in
    `SAMPLERS` (DDIM, DDPM, Euler ancestral, DPM-Solver++ 2M), the loop a `lax.scan`.

Each sampler is one `Sampler` record (names, diffusers class, config keys, defaults, its host-side
coefficients and its step), with its formulas narrated against its paper beside its functions.
Sampling is split into a host-side plan (`make_sampler_plan`: timesteps and per-step scalar
coefficients, computed in numpy with the same float32/float64 casts as diffusers) and a pure,
jittable loop (`run_sampler`) that takes the plan as a pytree; the model output is converted by
prediction type in one function, `predict_x0_and_eps`. The arithmetic mirrors diffusers'
schedulers term by term, so trajectories agree with `diffusers` to float32 rounding (tested in
tests/test_schedulers.py), quirks included: e.g. diffusers' DDIM always steps back by
`num_train_timesteps // num_steps`, whatever the spacing. Where diffusers' arithmetic breaks at the
zero-SNR end (square roots of differences rounding below 0, divisions by alpha_bar = 0, repeated
DPM-Solver lambdas) ours stays finite and equal to it everywhere else (tested over a grid).

Config keys that a scheduler class does not set fall back to that class's diffusers default
(`timestep_spacing` is 'leading' for DDIM/DDPM but 'linspace' for DPM-Solver/Euler), so
`sample('ddim', NoiseSchedule.from_config(cfg), ...)` matches `DDIMScheduler.from_config(cfg)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.cli import UserError, did_you_mean

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


# ------------------------------------------------------------------------------------------------
# The schedule: a config plus the alphas_cumprod table
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """A diffusers noise schedule. Static (hashable): jit treats it as a compile-time constant."""
  alphas_cumprod: np.ndarray  # [num_train_timesteps] float32, read-only
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None  # None: each sampler's diffusers default
  steps_offset: int = 0
  set_alpha_to_one: bool = True  # DDIM: alpha_bar "before" t=0 is 1, else alphas_cumprod[0]
  clip_sample: bool = True  # DDIM / DDPM clip the predicted x0 (diffusers' default is True)
  clip_sample_range: float = 1.0
  rescale_betas_zero_snr: bool = False
  variance_type: str = "fixed_small"  # DDPM's posterior variance
  # DPM-Solver++ options (DPMSolverMultistepScheduler's keys and defaults).
  solver_order: int = 2
  solver_type: str = "midpoint"
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "zero"
  use_karras_sigmas: bool = False

  @property
  def num_train_timesteps(self) -> int:
    return int(self.alphas_cumprod.shape[0])

  def _key(self):
    fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "alphas_cumprod")
    return fields + (self.alphas_cumprod.tobytes(),)

  def __eq__(self, other):
    return isinstance(other, NoiseSchedule) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def __repr__(self):
    fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                       if f.name != "alphas_cumprod")
    return f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, {fields})"

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
    """Builds the schedule from a diffusers scheduler config dict (any scheduler class).

    Keys this module does not use (`_class_name`, `skip_prk_steps`, ...) are ignored; keys it
    uses but whose value it cannot honour raise a ValueError naming the key.
    """
    config = dict(config)
    get = config.get
    num_train_timesteps = int(get("num_train_timesteps", 1000))
    if num_train_timesteps < 2:
      raise ValueError(f"num_train_timesteps={num_train_timesteps}: need at least 2 training timesteps.")
    beta_schedule = get("beta_schedule", "linear")
    trained_betas = get("trained_betas")
    prediction_type = get("prediction_type", "epsilon")
    spacing = get("timestep_spacing")
    if trained_betas is None:
      _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if spacing is not None:
      _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    variance_type = get("variance_type") or "fixed_small"
    _check_choice("variance_type", variance_type, DDPM_VARIANCE_TYPES)
    if get("thresholding", False):
      raise ValueError("thresholding=True (dynamic thresholding) is not supported: set it to false.")
    if get("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "deis"):
      raise ValueError(f"algorithm_type={get('algorithm_type')!r} is not supported: only 'dpmsolver++'.")
    for flag in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
      if get(flag, False):
        raise ValueError(f"{flag}=True is not supported: only use_karras_sigmas or the default sigmas.")
    if math.isfinite(float(get("lambda_min_clipped", -math.inf))):
      raise ValueError("lambda_min_clipped is not supported: remove it from the scheduler config.")
    solver_order = int(get("solver_order", 2))
    if solver_order not in (1, 2):
      raise ValueError(f"solver_order={solver_order} is not supported: use 1 or 2 (DPM-Solver++ 2M).")
    solver_type = get("solver_type", "midpoint")
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    final_sigmas_type = get("final_sigmas_type", "zero")
    _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))

    if trained_betas is not None:
      betas = np.asarray(trained_betas, np.float32)
      if betas.shape != (num_train_timesteps,):
        raise ValueError(f"trained_betas has shape {betas.shape}; expected ({num_train_timesteps},).")
    else:
      betas = _betas(beta_schedule, float(get("beta_start", 0.0001)), float(get("beta_end", 0.02)),
                     num_train_timesteps)
    rescale = bool(get("rescale_betas_zero_snr", False))
    if rescale:
      betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
    alphas_cumprod.setflags(write=False)
    return cls(
        alphas_cumprod=alphas_cumprod, beta_schedule=beta_schedule, prediction_type=prediction_type,
        timestep_spacing=spacing, steps_offset=int(get("steps_offset", 0)),
        set_alpha_to_one=bool(get("set_alpha_to_one", True)), clip_sample=bool(get("clip_sample", True)),
        clip_sample_range=float(get("clip_sample_range", 1.0)), rescale_betas_zero_snr=rescale,
        variance_type=variance_type, solver_order=solver_order, solver_type=solver_type,
        lower_order_final=bool(get("lower_order_final", True)),
        euler_at_final=bool(get("euler_at_final", False)), final_sigmas_type=final_sigmas_type,
        use_karras_sigmas=bool(get("use_karras_sigmas", False)))

  def replace(self, **changes) -> "NoiseSchedule":
    """A copy with some options changed, e.g. `schedule.replace(timestep_spacing='trailing')`."""
    if "prediction_type" in changes:
      _check_choice("prediction_type", changes["prediction_type"], PREDICTION_TYPES)
    if changes.get("timestep_spacing") is not None:
      _check_choice("timestep_spacing", changes["timestep_spacing"], TIMESTEP_SPACINGS)
    return dataclasses.replace(self, **changes)


# Static in jit: a schedule passed as an argument becomes part of the compiled function's key.
jax.tree_util.register_static(NoiseSchedule)


def _check_choice(key: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{key}={value!r} is not supported: choose one of {', '.join(map(repr, choices))}.")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32), bit for bit.

  torch fills the first half forwards from `start` and the second half backwards from `end`,
  with one float32 rounding of `start + step * i` (a fused multiply-add); float64 emulates it.
  """
  start32, end32 = np.float32(start), np.float32(end)
  step = (end32 - start32) / np.float32(n - 1)
  i = np.arange(n)
  forward = np.float64(start32) + np.float64(step) * i
  backward = np.float64(end32) - np.float64(step) * (n - 1 - i)
  return np.where(i < n // 2, forward, backward).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
  # torch's CPU cumprod accumulates float32 in float64 and rounds each output once.
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas(beta_schedule: str, beta_start: float, beta_end: float, n: int) -> np.ndarray:
  if beta_schedule == "linear":
    return _linspace_f32(beta_start, beta_end, n)
  if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
    return _linspace_f32(beta_start ** 0.5, beta_end ** 0.5, n) ** 2
  # squaredcos_cap_v2: Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999, in float64.
  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
  return np.asarray(betas, np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"):
  shift and scale sqrt(alpha_bar) so the last timestep is pure noise (SNR 0), first unchanged."""
  sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = sqrt_ab ** 2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Training side
# ------------------------------------------------------------------------------------------------
def _per_example(table: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
  """table[t] for t of shape [B], shaped [B, 1, ..., 1] to broadcast against `like` [B, ...]."""
  values = jnp.asarray(table)[jnp.asarray(t).astype(jnp.int32)]
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _alpha_sigma(schedule: NoiseSchedule, t, like):
  alpha_bar = _per_example(schedule.alphas_cumprod, t, like)
  # Coefficients are formed in float32 and only then cast, so bf16 latents don't round alpha_bar.
  return jnp.sqrt(alpha_bar).astype(like.dtype), jnp.sqrt(1.0 - alpha_bar).astype(like.dtype)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise. x0, noise: [B, ...]; t: [B] int."""
  alpha, sigma = _alpha_sigma(schedule, t, x0)
  return alpha * x0 + sigma * noise


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """What the UNet is trained to output at x_t: noise, v = alpha*noise - sigma*x0, or x0."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "sample":
    return x0
  alpha, sigma = _alpha_sigma(schedule, t, x0)
  return alpha * noise - sigma * x0


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t, float32."""
  alpha_bar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t).astype(jnp.int32)]
  return alpha_bar / (1.0 - alpha_bar)


def min_snr_loss_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float = 5.0) -> jax.Array:
  """Min-SNR-gamma weights (Hang et al. 2023) for a per-example MSE on this schedule's target.

  The paper's weight min(SNR, gamma) is for an x0 loss; an epsilon loss is x0 loss / SNR and a
  v loss is x0 loss / (SNR + 1), hence the divisions.
  """
  ratio = snr(schedule, t)
  clipped = jnp.minimum(ratio, gamma)
  if schedule.prediction_type == "epsilon":
    # min(SNR, gamma) / SNR, written so that SNR = 0 (zero terminal SNR) gives its limit 1, not 0/0.
    return jnp.where(ratio > gamma, gamma / ratio, 1.0)
  if schedule.prediction_type == "v_prediction":
    return clipped / (ratio + 1.0)
  return clipped


def offset_noise(rng: jax.Array, shape, strength: float = 0.1, channel_axis: int = -1,
                 dtype=jnp.float32) -> jax.Array:
  """Gaussian noise plus `strength` times a per-(example, channel) constant offset.

  Plain noise never shifts an image's mean, so a model trained on it cannot make very dark or
  bright images; the offset term (Guttenberg 2023) lets it learn to. shape: [B, ...] with
  channels on `channel_axis` (the last one for NHWC latents).
  """
  shape = tuple(shape)
  channel_axis = channel_axis % len(shape)
  offset_shape = tuple(s if axis in (0, channel_axis) else 1 for axis, s in enumerate(shape))
  rng_noise, rng_offset = jax.random.split(rng)
  return (jax.random.normal(rng_noise, shape, dtype)
          + strength * jax.random.normal(rng_offset, offset_shape, dtype))


# ------------------------------------------------------------------------------------------------
# Inference timesteps: the spacing rules the samplers share
# ------------------------------------------------------------------------------------------------
def _check_num_steps(schedule: NoiseSchedule, num_steps) -> int:
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= schedule.num_train_timesteps:
    raise ValueError(f"num_steps={num_steps!r}: must be an integer in [1, "
                     f"{schedule.num_train_timesteps}] (the number of training timesteps).")
  return int(num_steps)


def _discrete_timesteps(spacing: str, num_train: int, num_steps: int, steps_offset: int) -> np.ndarray:
  """'linspace' / 'leading' / 'trailing' spacing (the names of Lin et al. 2024), integral values as floats."""
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, num_steps).round()[::-1]
  if spacing == "leading":  # multiples of the stride counted up from 0, then shifted
    return (np.arange(num_steps) * (num_train // num_steps)).round()[::-1] + steps_offset
  return np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1  # trailing: down from T-1


def _integer_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
  return _discrete_timesteps(spacing, schedule.num_train_timesteps, num_steps,
                             schedule.steps_offset).astype(np.int64)


def _sigma_to_timestep(sigmas: np.ndarray, log_sigma_table: np.ndarray) -> np.ndarray:
  """Fractional timestep whose sigma is `sigma`, interpolating linearly in log sigma."""
  log_sigmas = np.log(np.maximum(sigmas, 1e-10))
  # Index of the last table entry at or below each log sigma, kept one short of the end.
  low = np.searchsorted(log_sigma_table, log_sigmas, side="right") - 1
  low = np.clip(low, 0, len(log_sigma_table) - 2)
  log_low, log_high = log_sigma_table[low], log_sigma_table[low + 1]
  w = np.clip((log_low - log_sigmas) / (log_low - log_high), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _sqrt0(x: np.ndarray) -> np.ndarray:
  """sqrt of a difference that is >= 0 in exact arithmetic but can round a hair below 0 in float32
  (at the zero-SNR end: 1 - alpha_bar_prev - sigma^2 with sigma^2 = 1 - alpha_bar_prev). diffusers
  takes the plain root there and gets NaN; where the argument is >= 0 this is the same value."""
  return np.sqrt(np.maximum(x, np.float32(0.0)))


# ------------------------------------------------------------------------------------------------
# The model output, converted by prediction type: the one place every sampler goes through
# ------------------------------------------------------------------------------------------------
# Where alpha_bar_t = 0 (zero terminal SNR), an epsilon model says nothing about x0 and x0 =
# (x - sigma * eps) / sqrt(alpha_bar) divides by zero (diffusers' DDIM and DDPM give inf/NaN). The
# division then uses alpha_bar = 2^-24 instead, the value diffusers' Euler and DPM-Solver already put
# at the end of their sigma tables, so the result is finite and unchanged wherever alpha_bar > 0.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def _nonzero(scale: jax.Array) -> jax.Array:
  return jnp.where(scale > 0, scale, np.float32(ZERO_SNR_ALPHA_BAR ** 0.5))


def predict_x0_and_eps(prediction_type: str, x: jax.Array, out: jax.Array, alpha, sigma):
  """(x0, eps): the clean sample and the noise that the model output `out` implies at x.

  x = alpha * x0 + sigma * eps is the variance-preserving noisy sample (alpha = sqrt(alpha_bar_t),
  sigma = sqrt(1 - alpha_bar_t), scalars or broadcastable); `out` is eps ('epsilon', Ho et al.
  2020), x0 ('sample') or v = alpha * eps - sigma * x0 ('v_prediction', Salimans & Ho 2022, Sec. 4),
  so x0 = alpha * x - sigma * v and eps = alpha * v + sigma * x. The term order is diffusers', so
  the float32 results are its. Zero alpha (or sigma) in a division: see ZERO_SNR_ALPHA_BAR.
  """
  if prediction_type == "epsilon":
    return (x - sigma * out) / _nonzero(alpha), out
  if prediction_type == "sample":
    return out, (x - alpha * out) / _nonzero(sigma)
  return alpha * x - sigma * out, alpha * out + sigma * x


def _vp_coefs(alpha_bar: np.ndarray) -> dict:
  """What the loop needs to call the model and convert its output at alpha_bar_t [n]: the sample is
  x itself (input_divisor 1) and x = alpha * x0 + sigma * eps."""
  return dict(alpha=np.sqrt(alpha_bar), sigma=np.sqrt(np.float32(1.0) - alpha_bar),
              input_divisor=np.ones_like(alpha_bar))


# ------------------------------------------------------------------------------------------------
# Sampler plans: timesteps and per-step scalar coefficients, computed on the host in float32
# ------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class SamplerPlan:
  """Everything a sampler loop needs besides the model: a pytree of [num_steps] tables.

  Every plan has the coefficients `alpha`, `sigma` (the model output's conversion, see
  `predict_x0_and_eps`) and `input_divisor` (model input = x / input_divisor), plus its sampler's own.
  Passing a plan through `jax.jit` as an argument means schedules of one shape share a compile.
  """
  timesteps: jax.Array  # [n] float32, what denoise_fn sees as t
  coefs: dict  # name -> [n] float32
  init_noise_sigma: jax.Array  # [] float32
  kind: str = flax.struct.field(pytree_node=False)  # the Sampler's name
  prediction_type: str = flax.struct.field(pytree_node=False)
  clip_range: float | None = flax.struct.field(pytree_node=False)  # clamp x0 to +-this, or None
  stochastic: bool = flax.struct.field(pytree_node=False)  # needs per-step noise

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


# Each sampler below: its formulas against its paper, then the host-side coefficients
# (schedule, timesteps, spacing, eta) -> (coefs, init_noise_sigma) and the device-side step
# (coefs of this step, x, x0, eps, history, noise) -> (x_prev, history). alpha_bar is written `ab`.

# ------------------------------------------------------------------------------------------------
# DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16
# ------------------------------------------------------------------------------------------------
#   x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z,
#   s^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)   (eta = 1: the DDPM posterior's)
# As diffusers' DDIMScheduler: prev = t - T // n whatever the spacing (so 'trailing' with T % n != 0
# ends at ab[0], not 1; kept for exact equality); after t = 0 the previous ab is 1 (set_alpha_to_one)
# or ab[0]; x0 is clipped with clip_sample, eps stays the unclipped one.
def _ddim_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray, spacing: str, eta: float):
  ac = schedule.alphas_cumprod
  prev = timesteps - schedule.num_train_timesteps // len(timesteps)
  final_alpha_bar = np.float32(1.0) if schedule.set_alpha_to_one else ac[0]
  alpha_t = ac[timesteps]
  alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final_alpha_bar)
  beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
  variance = np.maximum((beta_prev / beta_t) * (1 - alpha_t / alpha_prev), np.float32(0.0))
  std = np.float32(eta) * np.sqrt(variance)
  return dict(_vp_coefs(alpha_t), sqrt_alpha_prev=np.sqrt(alpha_prev),
              direction=_sqrt0(1 - alpha_prev - std ** 2), noise_std=std), np.float32(1.0)


def _ddim_step(c, x, x0, eps, history, noise):
  x_prev = c["sqrt_alpha_prev"] * x0 + c["direction"] * eps
  if noise is not None:  # eta > 0
    x_prev = x_prev + c["noise_std"] * noise
  return x_prev, history


# ------------------------------------------------------------------------------------------------
# DDPM: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7 (ancestral)
# ------------------------------------------------------------------------------------------------
#   x_prev = sqrt(ab_prev) b / (1 - ab_t) x0 + sqrt(a) (1 - ab_prev) / (1 - ab_t) x_t + s z,
# the posterior q(x_prev | x_t, x0) of the (strided) step with a = ab_t / ab_prev, b = 1 - a;
# s^2 = (1 - ab_prev) / (1 - ab_t) b ('fixed_small', floored at 1e-20; 'fixed_small_log' the same
# through exp(log)) or b ('fixed_large'); no noise into t = 0. As diffusers' DDPMScheduler: prev is
# the next timestep in the list (-1 after the last, ab = 1); x0 clipped with clip_sample.
def _ddpm_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray, spacing: str, eta: float):
  ac = schedule.alphas_cumprod
  prev = np.concatenate([timesteps[1:], [-1]])
  alpha_t = ac[timesteps]
  alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0))
  beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
  step_alpha = alpha_t / alpha_prev
  step_beta = 1 - step_alpha
  variance = np.maximum(beta_prev / beta_t * step_beta, np.float32(1e-20))
  if schedule.variance_type == "fixed_small":
    std = np.sqrt(variance)
  elif schedule.variance_type == "fixed_small_log":
    std = np.exp(np.float32(0.5) * np.log(variance))
  else:  # fixed_large: the forward step's variance
    std = _sqrt0(step_beta)
  std = np.where(timesteps > 0, std, np.float32(0.0))
  return dict(_vp_coefs(alpha_t), x0_coef=np.sqrt(alpha_prev) * step_beta / beta_t,
              xt_coef=_sqrt0(step_alpha) * beta_prev / beta_t, noise_std=std), np.float32(1.0)


def _ddpm_step(c, x, x0, eps, history, noise):
  return c["x0_coef"] * x0 + c["xt_coef"] * x + c["noise_std"] * noise, history


# ------------------------------------------------------------------------------------------------
# Euler ancestral: Karras et al. 2022 ("Elucidating the Design Space...", Alg. 1's Euler step) with
# k-diffusion's ancestral noise (Crowson), as diffusers' EulerAncestralDiscreteScheduler
# ------------------------------------------------------------------------------------------------
# In the variance-exploding form x = x0 + sigma eps, sigma = sqrt((1 - ab) / ab) (interpolated at
# fractional timesteps; ab = 0 is ZERO_SNR_ALPHA_BAR there, as diffusers). The model sees
# x / sqrt(sigma^2 + 1), the variance-preserving sample. The step to sigma_to splits into a
# deterministic part down to sigma_down and fresh noise sigma_up, sigma_down^2 + sigma_up^2 = sigma_to^2:
#   sigma_up = sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2), sigma_down = sqrt(sigma_to^2 - sigma_up^2),
#   d = (x - x0) / sigma,   x_next = x + d (sigma_down - sigma) + sigma_up z.
def _sigma_table(schedule: NoiseSchedule) -> np.ndarray:
  """sqrt((1 - ab) / ab) per training timestep, float32, as the sigma samplers see it."""
  alphas_cumprod = np.where(schedule.alphas_cumprod > 0, schedule.alphas_cumprod,
                            np.float32(ZERO_SNR_ALPHA_BAR))  # zero-SNR's last ab (diffusers' stand-in)
  return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def _euler_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str) -> np.ndarray:
  num_train = schedule.num_train_timesteps
  if spacing == "linspace":  # float32 linspace here, as in diffusers
    return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
  return _discrete_timesteps(spacing, num_train, num_steps, schedule.steps_offset).astype(np.float32)


def _euler_ancestral_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray, spacing: str, eta: float):
  sigmas = np.interp(timesteps, np.arange(schedule.num_train_timesteps), _sigma_table(schedule))
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # [n + 1]
  init_sigma = sigmas.max() if spacing in ("linspace", "trailing") else np.sqrt(sigmas.max() ** 2 + 1)
  sigma, sigma_to = sigmas[:-1], sigmas[1:]
  sigma_up = _sqrt0(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2)
  sigma_down = _sqrt0(sigma_to ** 2 - sigma_up ** 2)
  input_divisor = np.sqrt(sigma ** 2 + 1)
  # alpha = 1 / sqrt(sigma^2 + 1) and sigma / sqrt(sigma^2 + 1): the model input's VP coefficients.
  coefs = dict(alpha=np.float32(1.0) / input_divisor, sigma=sigma / input_divisor,
               input_divisor=input_divisor, ve_sigma=sigma, dt=sigma_down - sigma, noise_std=sigma_up)
  return coefs, init_sigma


def _euler_ancestral_step(c, x, x0, eps, history, noise):
  derivative = (x - x0) / c["ve_sigma"]
  return x + derivative * c["dt"] + noise * c["noise_std"], history


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
# Probabilistic Models", Alg. 2 (multistep, second order), as diffusers' DPMSolverMultistepScheduler
# ------------------------------------------------------------------------------------------------
# With alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t (sigma the VE sigma above, or
# Karras et al.'s rho = 7 ramp with use_karras_sigmas) and lambda = log(alpha_t / sigma_t):
#   h = lambda_t - lambda_s,  D0 = x0_s,  D1 = (x0_s - x0_prev) / r,  r = (lambda_s - lambda_prev) / h,
#   x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 - c1 D1,
#   c1 = alpha_t (e^-h - 1) / 2 ('midpoint') or alpha_t ((e^-h - 1) / h + 1) ('heun').
# The first step has no history and the last falls back to first order (lower_order_final,
# euler_at_final, final sigma 0), as diffusers. A step whose r is 0 or h is 0 (repeated timesteps:
# Karras sigmas on the cosine schedule, 'leading' with n near T) would divide by zero in D1; it is
# taken first order instead (diffusers gives inf/NaN there).
def _dpm_timesteps_and_sigmas(schedule: NoiseSchedule, num_steps: int, spacing: str | None = None):
  """DPM-Solver's timesteps (its own spacing rules) and its num_steps + 1 sigmas, float32."""
  num_train, offset = schedule.num_train_timesteps, schedule.steps_offset
  spacing = spacing or schedule.timestep_spacing or SAMPLERS["dpmsolver++"].default_spacing
  # DPM-Solver spaces num_steps + 1 points and drops the last (t=0), except 'trailing'.
  if spacing == "linspace":
    timesteps = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    stride = num_train // (num_steps + 1)
    timesteps = (np.arange(num_steps + 1) * stride).round()[::-1][:-1].astype(np.int64) + offset
  else:
    timesteps = np.arange(num_train, 0, -num_train / num_steps).round().astype(np.int64) - 1
  sigma_table = _sigma_table(schedule)  # [T] float32, increasing with t
  if schedule.use_karras_sigmas:
    # Karras et al. 2022, eq. 5: sigma^(1/7) evenly spaced between sigma_max and sigma_min.
    rho = 7.0
    sigma_min, sigma_max = float(sigma_table[0]), float(sigma_table[-1])
    ramp = np.linspace(0, 1, num_steps)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    timesteps = _sigma_to_timestep(sigmas, np.log(sigma_table))
    if schedule.beta_schedule != "squaredcos_cap_v2":
      timesteps = timesteps.round()
    timesteps = timesteps.astype(np.int64)
  else:
    sigmas = np.interp(timesteps, np.arange(num_train), sigma_table)
  if schedule.final_sigmas_type == "zero":
    sigma_last = 0.0
  else:
    alpha_bar_0 = schedule.alphas_cumprod[0]
    sigma_last = np.sqrt((np.float32(1.0) - alpha_bar_0) / alpha_bar_0)
  return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(np.float32)


def _dpm_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray, spacing: str, eta: float):
  sigmas = _dpm_timesteps_and_sigmas(schedule, len(timesteps), spacing)[1]
  num_steps = len(sigmas) - 1
  with np.errstate(divide="ignore", invalid="ignore"):  # final sigma 0: lambda = +inf, on purpose
    alpha = np.float32(1.0) / np.sqrt(sigmas ** 2 + 1)
    sigma = sigmas * alpha
    lam = np.log(alpha) - np.log(sigma)
    alpha_s0, sigma_s0, lam_s0 = alpha[:-1], sigma[:-1], lam[:-1]
    alpha_t, sigma_t, lam_t = alpha[1:], sigma[1:], lam[1:]
    lam_s1 = np.concatenate([lam[:1], lam[:-2]])  # the previous step's lambda (unused at step 0)
    h = lam_t - lam_s0
    expm1 = np.exp(-h) - np.float32(1.0)
    inv_r0 = np.float32(1.0) / ((lam_s0 - lam_s1) / h)
    if schedule.solver_type == "midpoint":
      d1_coef = np.float32(0.5) * (alpha_t * expm1)
    else:  # heun
      d1_coef = -(alpha_t * (expm1 / h + np.float32(1.0)))
  step = np.arange(num_steps)
  last = step == num_steps - 1
  first_order_final = last & (schedule.euler_at_final
                              or (schedule.lower_order_final and num_steps < 15)
                              or schedule.final_sigmas_type == "zero")
  second_order = ((step >= 1) & ~first_order_final & (schedule.solver_order == 2)
                  & np.isfinite(inv_r0) & np.isfinite(d1_coef))
  zero = np.float32(0.0)
  coefs = dict(alpha=alpha_s0, sigma=sigma_s0, input_divisor=np.ones_like(alpha_s0), x_coef=sigma_t / sigma_s0,
               d0_coef=alpha_t * expm1, d1_coef=np.where(second_order, d1_coef, zero),
               inv_r0=np.where(second_order, inv_r0, zero))
  return coefs, np.float32(1.0)


def _dpm_step(c, x, x0, eps, prev_x0, noise):
  d1 = c["inv_r0"] * (x0 - prev_x0)
  return c["x_coef"] * x - c["d0_coef"] * x0 - c["d1_coef"] * d1, x0


# ------------------------------------------------------------------------------------------------
# The samplers: one record each
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampler:
  """Everything about one sampler. Its formulas are narrated beside its functions above."""
  name: str  # this module's name, e.g. 'dpmsolver++'
  short_name: str  # the name `generate`, the CLI and configs use, e.g. 'dpm++2m'
  diffusers_class: str  # the diffusers scheduler whose trajectories it equals (tests/test_schedulers.py)
  summary: str  # one line for --help
  default_spacing: str  # timestep_spacing when the config names none: that class's default
  options: tuple[str, ...]  # scheduler-config keys (NoiseSchedule fields) only this sampler reads
  timesteps: Callable[[NoiseSchedule, int, str], np.ndarray]  # (schedule, num_steps, spacing)
  coefficients: Callable[..., tuple[dict, Any]]  # (schedule, timesteps, spacing, eta) -> (coefs, init sigma)
  step: Callable  # (coefs, x, x0, eps, history, noise) -> (x_prev, history)
  stochastic: bool = False  # draws fresh noise every step (DDIM: only with eta > 0)
  takes_eta: bool = False
  multistep: bool = False  # carries the previous step's x0 prediction

  @property
  def clips_x0(self) -> bool:
    return "clip_sample" in self.options


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("dpmsolver++", "dpm++2m", "DPMSolverMultistepScheduler",
            "DPM-Solver++ 2M, good in 20-30 steps", "linspace",
            ("solver_order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
             "use_karras_sigmas"),
            lambda schedule, n, spacing: _dpm_timesteps_and_sigmas(schedule, n, spacing)[0],
            _dpm_coefficients, _dpm_step, multistep=True),
    Sampler("ddim", "ddim", "DDIMScheduler", "deterministic (stochastic with eta > 0)", "leading",
            ("set_alpha_to_one", "clip_sample", "clip_sample_range"),
            _integer_timesteps, _ddim_coefficients, _ddim_step, takes_eta=True),
    Sampler("euler_ancestral", "euler_a", "EulerAncestralDiscreteScheduler", "Euler ancestral", "linspace",
            (), _euler_timesteps, _euler_ancestral_coefficients, _euler_ancestral_step, stochastic=True),
    Sampler("ddpm", "ddpm", "DDPMScheduler", "the slow original (~1000 steps)", "leading",
            ("variance_type", "clip_sample", "clip_sample_range"),
            _integer_timesteps, _ddpm_coefficients, _ddpm_step, stochastic=True),
)}


def get_sampler(name: str) -> Sampler:
  """The sampler called `name`: its short name (e.g. 'dpm++2m') or its name (e.g. 'dpmsolver++').

  Raises clip_jax.cli.UserError (a ValueError) naming the choices for any other name.
  """
  for sampler in SAMPLERS.values():
    if name in (sampler.short_name, sampler.name):
      return sampler
  names = [n for s in SAMPLERS.values() for n in (s.short_name, s.name)]
  raise UserError(f"unknown sampler {name!r};{did_you_mean(name, names)} choose one of "
                  f"{', '.join(repr(s.short_name) for s in SAMPLERS.values())}.")


def _spacing(sampler: Sampler, schedule: NoiseSchedule) -> str:
  return schedule.timestep_spacing or sampler.default_spacing


def inference_timesteps(kind: str, schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """The timesteps the sampler evaluates the model at, in order (equal to diffusers' `timesteps`).

  int64 for every sampler except Euler ancestral, whose diffusers timesteps are float32.
  """
  sampler = get_sampler(kind)
  num_steps = _check_num_steps(schedule, num_steps)
  spacing = _spacing(sampler, schedule)
  timesteps = sampler.timesteps(schedule, num_steps, spacing)
  if timesteps.max() >= schedule.num_train_timesteps or timesteps.min() < 0:
    raise ValueError(f"steps_offset={schedule.steps_offset} with {num_steps} '{spacing}' steps puts a "
                     f"timestep outside [0, {schedule.num_train_timesteps}): lower steps_offset or num_steps.")
  return timesteps


def init_noise_sigma(kind: str, schedule: NoiseSchedule, num_steps: int) -> float:
  """Standard deviation of the starting latents: 1 for DDIM/DDPM/DPM, sigma_max-ish for Euler."""
  return float(make_sampler_plan(kind, schedule, num_steps).init_noise_sigma)


def make_sampler_plan(kind: str, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0) -> SamplerPlan:
  """Host-side: the timesteps and per-step coefficients of sampler `kind` for `num_steps` steps.

  eta: DDIM's noise scale (0 deterministic, 1 the DDPM posterior); other samplers reject eta != 0.
  Every coefficient is finite for every schedule, spacing and step count (tested), also where
  diffusers' are not (see `_sqrt0`, `ZERO_SNR_ALPHA_BAR`, the DPM-Solver notes).
  """
  sampler = get_sampler(kind)
  timesteps = inference_timesteps(sampler.name, schedule, num_steps)
  eta = float(eta)
  if eta != 0.0 and not sampler.takes_eta:
    raise ValueError(f"eta={eta} only applies to the 'ddim' sampler, not {kind!r}.")
  if eta < 0:
    raise ValueError(f"eta={eta}: must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like).")
  coefs, init_sigma = sampler.coefficients(schedule, timesteps, _spacing(sampler, schedule), eta)
  for name, value in coefs.items():
    assert value.shape == timesteps.shape and value.dtype == np.float32, (name, value.shape, value.dtype)
  clip = schedule.clip_sample_range if schedule.clip_sample and sampler.clips_x0 else None
  return SamplerPlan(
      timesteps=jnp.asarray(timesteps, jnp.float32), coefs={k: jnp.asarray(v) for k, v in coefs.items()},
      init_noise_sigma=jnp.asarray(init_sigma, jnp.float32), kind=sampler.name,
      prediction_type=schedule.prediction_type, clip_range=clip, stochastic=sampler.stochastic or eta > 0)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def run_sampler(plan: SamplerPlan, denoise_fn: DenoiseFn, latents_init: jax.Array,
                rng: jax.Array | None = None, *, noise: jax.Array | None = None,
                return_trajectory: bool = False):
  """Runs a plan from unit-variance `latents_init` [B, ...]; pure and jittable.

  denoise_fn(x_t, t) -> model output shaped like x_t; t is a float32 scalar timestep. The Euler
  input scaling (x / sqrt(sigma^2 + 1)) is applied before the call, as diffusers'
  `scale_model_input` does, and latents_init is multiplied by the plan's init_noise_sigma.
  Stochastic samplers (DDPM, Euler ancestral, DDIM with eta > 0) take either `rng` or `noise`
  [num_steps, B, ...], the exact per-step standard-normal draws; deterministic ones ignore both.
  Returns the final latents, and with return_trajectory also the latents after every step
  [num_steps, B, ...]. The loop runs in float32; the result has latents_init's dtype.
  """
  num_steps = plan.num_steps
  if plan.stochastic and noise is None and rng is None:
    raise ValueError(f"the {plan.kind!r} sampler is stochastic: pass rng= or noise=[num_steps, ...].")
  if noise is not None and tuple(noise.shape) != (num_steps,) + tuple(latents_init.shape):
    raise ValueError(f"noise has shape {tuple(noise.shape)}; expected (num_steps, *latents.shape) = "
                     f"{(num_steps,) + tuple(latents_init.shape)}.")
  sampler = SAMPLERS[plan.kind]
  model_dtype = latents_init.dtype
  x = latents_init.astype(jnp.float32) * plan.init_noise_sigma
  history = jnp.zeros_like(x) if sampler.multistep else None

  if not plan.stochastic:
    per_step_noise = None
  elif noise is not None:
    per_step_noise = noise.astype(jnp.float32)
  else:
    per_step_noise = jax.random.split(rng, num_steps)

  def body(carry, xs):
    x, history = carry
    t, c, step_noise = xs
    if step_noise is not None and step_noise.dtype != jnp.float32:  # a key: draw now
      step_noise = jax.random.normal(step_noise, x.shape, jnp.float32)
    model_in = x / c["input_divisor"]
    out = denoise_fn(model_in.astype(model_dtype), t).astype(jnp.float32)
    x0, eps = predict_x0_and_eps(plan.prediction_type, model_in, out, c["alpha"], c["sigma"])
    if plan.clip_range is not None:  # eps stays the unclipped one, as in diffusers
      x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
    x, history = sampler.step(c, x, x0, eps, history, step_noise)
    return (x, history), (x.astype(model_dtype) if return_trajectory else None)

  (x, _), trajectory = jax.lax.scan(body, (x, history), (plan.timesteps, plan.coefs, per_step_noise))
  x = x.astype(model_dtype)
  return (x, trajectory) if return_trajectory else x


def sample(kind: str, schedule: NoiseSchedule, denoise_fn: DenoiseFn, latents_init: jax.Array,
           num_steps: int, rng: jax.Array | None = None, *, eta: float = 0.0,
           noise: jax.Array | None = None, return_trajectory: bool = False):
  """Samples with sampler `kind` in `num_steps` model calls. See `run_sampler` for the arguments.

  Jittable when kind, schedule, num_steps, eta and return_trajectory are static.
  """
  plan = make_sampler_plan(kind, schedule, num_steps, eta)
  return run_sampler(plan, denoise_fn, latents_init, rng, noise=noise, return_trajectory=return_trajectory)


def guided_denoise_fn(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                      cond: jax.Array, uncond: jax.Array, guidance_scale) -> DenoiseFn:
  """Classifier-free guidance: out = uncond_out + scale * (cond_out - uncond_out).

  model_fn(x [N, ...], t [N], context [N, ...]) -> [N, ...] is the UNet with its params bound;
  cond [B, ...] / uncond [B or 1, ...] are the text embeddings. Both halves go through one model
  call on a doubled batch. A Python guidance_scale of 1 skips the unconditional half.
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
    def denoise_cond(x, t):
      return model_fn(x, jnp.broadcast_to(t, (x.shape[0],)), cond)
    return denoise_cond

  def denoise(x, t):
    batch = x.shape[0]
    if cond.shape[0] != batch:
      raise ValueError(f"cond has batch {cond.shape[0]} but the latents have {batch}: give one "
                       "text embedding per sample.")
    uncond_b = jnp.broadcast_to(uncond, (batch,) + uncond.shape[1:])
    out = model_fn(jnp.concatenate([x, x]), jnp.broadcast_to(t, (2 * batch,)),
                   jnp.concatenate([uncond_b, cond]))
    out_uncond, out_cond = out[:batch], out[batch:]
    return out_uncond + guidance_scale * (out_cond - out_uncond)
  return denoise
