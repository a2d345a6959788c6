"""dreambooth_jax.sampling.schedulers against diffusers' PyTorch schedulers built from the same config dicts.

The model is replaced by an analytic denoiser (the same arithmetic in torch and jax), and the
stochastic samplers get the same per-step noise on both sides, so whole sampling trajectories
must agree to float32 rounding.
"""
import dataclasses
import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete  # noqa: E402

from dreambooth_jax.sampling import schedulers as S  # noqa: E402

RTOL = 1e-5
# diffusers' np.array(tensor) calls trip a numpy 2 DeprecationWarning on every set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
LATENT_SHAPE = (2, 4, 4, 3)  # [B, H, W, C]; the denoiser is layout-agnostic, so torch uses it too

# Each sampler's record names the diffusers class it must equal.
TORCH_SCHEDULERS = {kind: getattr(diffusers, sampler.diffusers_class) for kind, sampler in S.SAMPLERS.items()}


def make_config(beta_schedule="scaled_linear", prediction_type="epsilon", spacing="leading", **extra):
  """A Stable-Diffusion-like scheduler_config.json dict."""
  config = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": beta_schedule,
            "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1,
            "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}
  if beta_schedule == "scaled_linear":
    config.update(beta_start=0.00085, beta_end=0.012)
  elif beta_schedule == "linear":
    config.update(beta_start=0.0001, beta_end=0.02)
  config.update(extra)
  return config


def torch_scheduler(kind, config):
  return TORCH_SCHEDULERS[kind].from_config(config)


# The analytic "UNet": linear in x_t with t-dependent coefficients, plus a channel mix.
def denoise_np_like(x, t, xp):
  t = t / 1000.0
  scale = 0.55 + 0.3 * xp.cos(3.0 * t)
  shift = 0.1 * xp.sin(7.0 * t)
  mixed = xp.roll(x, 1, -1) if xp is jnp else torch.roll(x, 1, -1)
  return scale * x + 0.15 * mixed + shift


def denoise_jax(x, t):
  return denoise_np_like(x, t.astype(jnp.float32), jnp)


def denoise_torch(x, t):
  return denoise_np_like(x, torch.as_tensor(t, dtype=torch.float32), torch)


def our_sigmas(kind, config, num_steps):
  """The num_steps + 1 sigmas of the sigma-parametrized samplers (Euler, DPM-Solver), float32."""
  schedule = S.NoiseSchedule.from_config(config)
  if kind == "dpmsolver++":
    return S._dpm_timesteps_and_sigmas(schedule, num_steps)[1]
  plan = S.make_sampler_plan(kind, schedule, num_steps)
  return np.concatenate([np.asarray(plan.coefs["ve_sigma"]), [0.0]]).astype(np.float32)


def torch_trajectory(kind, config, num_steps, latents, noise=None, eta=0.0, monkeypatch=None, restart_from=None):
  """diffusers' sampling loop as the pipelines write it, recording the latents after each step.

  restart_from: our trajectory [n, ...]; each step i > 0 then starts from restart_from[i - 1], not
  from diffusers' own previous output, so step i is diffusers' one step on our latents (NaN/inf where
  diffusers' arithmetic breaks, and only at that step).
  """
  sched = torch_scheduler(kind, config)
  sched.set_timesteps(num_steps)
  if kind in ("dpmsolver++", "euler_ancestral"):
    # Walk the steps in order even where timesteps repeat (DPM + Karras + cosine does that, and
    # diffusers' timestep-to-index lookup then runs off the end).
    sched.set_begin_index(0)
  x = torch.from_numpy(latents) * sched.init_noise_sigma
  current = {}
  if noise is not None and kind in ("ddpm", "euler_ancestral"):
    # These steps draw their noise internally: hand them ours, indexed by step (DDPM skips the
    # draw at t=0, so counting calls would drift).
    module = scheduling_ddpm if kind == "ddpm" else scheduling_euler_ancestral_discrete
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: current["noise"].reshape(shape))
  trajectory = []
  for i, t in enumerate(sched.timesteps):
    if restart_from is not None and i > 0:
      x = torch.from_numpy(np.array(restart_from[i - 1]))
    out = denoise_torch(sched.scale_model_input(x, t), t)
    kwargs = {}
    if noise is not None:
      current["noise"] = torch.from_numpy(noise[i])
      if kind == "ddim":
        kwargs = dict(eta=eta, variance_noise=current["noise"])
    with np.errstate(all="ignore"):
      x = sched.step(out, t, x, **kwargs).prev_sample
    trajectory.append(x.numpy().copy())
  return np.stack(trajectory)


_run_sampler = jax.jit(S.run_sampler, static_argnames=("denoise_fn", "return_trajectory"))


def jax_trajectory(kind, config, num_steps, latents, noise=None, eta=0.0):
  plan = S.make_sampler_plan(kind, S.NoiseSchedule.from_config(config), num_steps, eta=eta)
  _, trajectory = _run_sampler(plan, denoise_jax, jnp.asarray(latents),
                               noise=None if noise is None else jnp.asarray(noise), return_trajectory=True)
  return np.asarray(trajectory)


def trajectory_rtol(kind, config, num_steps):
  """RTOL, or more where float32 itself cannot agree that well.

  Euler's first step from sigma_max takes x ~ sigma_max * z to x ~ sigma_1 * z by cancelling two
  terms of size sigma_max (x + derivative * dt; with v-prediction the derivative is ~x / sigma),
  so one float32 rounding in it (ours, torch's x ** 0.5, an FMA) moves the result by up to
  ~2^-24 * sigma_max / sigma_1 relative: ~2e-4 for the cosine schedule (sigma_max ~ 2e4) or
  zero-SNR betas, whichever implementation is 'right'. Elsewhere the observed error is < 1e-6.
  """
  if kind != "euler_ancestral":
    return RTOL
  sigmas = our_sigmas(kind, config, num_steps)
  return max(RTOL, 4 * 2.0 ** -24 * float(sigmas[0] / sigmas[1]))


def assert_trajectories_close(actual, expected, rtol=RTOL):
  """Per step: max |actual - expected| <= rtol * max |expected| (relative to the step's scale)."""
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  assert np.all(np.isfinite(expected))
  for step, (a, e) in enumerate(zip(actual, expected)):
    err = np.abs(a - e).max() / np.abs(e).max()
    assert err <= rtol, f"step {step}: relative error {err:.2e} > {rtol:.0e}"


def random_inputs(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
  noise = rng.standard_normal((num_steps,) + LATENT_SHAPE).astype(np.float32)
  return latents, noise


# ------------------------------------------------------------------------------------------------
# Schedule tables and timesteps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    make_config("linear"), make_config("scaled_linear"), make_config("squaredcos_cap_v2"),
    make_config("scaled_linear", rescale_betas_zero_snr=True),
    make_config(trained_betas=list(np.linspace(1e-4, 0.03, 1000))),
    {"num_train_timesteps": 37, "beta_schedule": "scaled_linear"},
], ids=["linear", "scaled_linear", "cosine", "zero_snr", "trained_betas", "T37"])
def test_alphas_cumprod_bitwise(config):
  ours = S.NoiseSchedule.from_config(config).alphas_cumprod
  theirs = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
  assert ours.dtype == np.float32
  if config.get("rescale_betas_zero_snr"):
    # torch's vectorized float32 sqrt is not always correctly rounded (numpy's is), and the
    # rescale divides nearby values, so a 1-ulp sqrt difference grows to a few 1e-6 near t=T.
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=0)
  else:
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kind", S.SAMPLERS)
def test_timesteps_equal(kind):
  for spacing, num_steps, offset in itertools.product(
      ["leading", "trailing", "linspace", None], [1, 7, 20, 50, 333, 999], [0, 1]):
    config = make_config(spacing=spacing, steps_offset=offset)
    if spacing is None:
      del config["timestep_spacing"]  # each class's own default
    sched = torch_scheduler(kind, config)
    sched.set_timesteps(num_steps)
    theirs = sched.timesteps.numpy()
    if theirs.max() >= 1000:  # 'leading' + steps_offset ran past the table: ours refuses it
      with pytest.raises(ValueError, match="steps_offset"):
        S.inference_timesteps(kind, S.NoiseSchedule.from_config(config), num_steps)
      continue
    ours = S.inference_timesteps(kind, S.NoiseSchedule.from_config(config), num_steps)
    assert ours.dtype == theirs.dtype, (spacing, num_steps)
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{spacing} {num_steps} offset={offset}")
    assert S.init_noise_sigma(kind, S.NoiseSchedule.from_config(config), num_steps) == pytest.approx(
        float(sched.init_noise_sigma), rel=1e-6)  # torch's float32 sqrt may be 1 ulp off


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_dpm_karras_timesteps_and_sigmas(beta_schedule):
  config = make_config(beta_schedule, spacing="linspace", use_karras_sigmas=True)
  schedule = S.NoiseSchedule.from_config(config)
  for num_steps in (5, 25):
    sched = torch_scheduler("dpmsolver++", config)
    sched.set_timesteps(num_steps)
    timesteps, sigmas = S._dpm_timesteps_and_sigmas(schedule, num_steps)
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=1e-6)  # sqrt ulps, see above


@pytest.mark.parametrize("kind", ["dpmsolver++", "euler_ancestral"])
@pytest.mark.parametrize("config", [
    make_config("linear", spacing="trailing"), make_config("squaredcos_cap_v2", spacing="trailing"),
    make_config(spacing="trailing", rescale_betas_zero_snr=True), make_config(spacing="linspace"),
], ids=["linear", "cosine", "zero_snr", "scaled_linear"])
def test_sigma_tables(kind, config):
  sched = torch_scheduler(kind, config)
  sched.set_timesteps(10)
  np.testing.assert_allclose(our_sigmas(kind, config, 10), sched.sigmas.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Training side
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_and_targets(beta_schedule):
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((6, 4, 4, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 250, 500, 998, 999])
  sched = diffusers.DDPMScheduler.from_config(make_config(beta_schedule))
  x0_t, noise_t, t_t = map(torch.from_numpy, (x0, noise, t))
  for prediction_type in ("epsilon", "v_prediction", "sample"):
    schedule = S.NoiseSchedule.from_config(make_config(beta_schedule, prediction_type))
    noisy = S.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(noisy, sched.add_noise(x0_t, noise_t, t_t).numpy(), rtol=RTOL, atol=1e-6)
    expected_target = {"epsilon": noise, "sample": x0,
                       "v_prediction": sched.get_velocity(x0_t, noise_t, t_t).numpy()}[prediction_type]
    target = S.training_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(target, expected_target, rtol=RTOL, atol=1e-6)


def test_snr_and_min_snr_weights():
  t = np.array([0, 10, 400, 999])
  for prediction_type in ("epsilon", "v_prediction", "sample"):
    config = make_config(prediction_type=prediction_type)
    schedule = S.NoiseSchedule.from_config(config)
    # As diffusers.training_utils.compute_snr (not imported: it pulls in the training stack).
    alphas_cumprod = diffusers.DDPMScheduler.from_config(config).alphas_cumprod[torch.from_numpy(t)]
    reference = ((alphas_cumprod ** 0.5 / (1 - alphas_cumprod) ** 0.5) ** 2).numpy()
    ratio = np.asarray(S.snr(schedule, jnp.asarray(t)))
    np.testing.assert_allclose(ratio, reference, rtol=1e-6)
    clipped = np.minimum(reference, 5.0)
    # The weights of diffusers' train_text_to_image.py --snr_gamma, per prediction type.
    expected = {"epsilon": clipped / reference, "v_prediction": clipped / (reference + 1),
                "sample": clipped}[prediction_type]
    np.testing.assert_allclose(S.min_snr_loss_weight(schedule, jnp.asarray(t), 5.0), expected, rtol=1e-6)


def test_offset_noise():
  shape = (64, 8, 8, 3)
  plain = np.asarray(S.offset_noise(jax.random.key(0), shape, strength=0.0))
  offset = np.asarray(S.offset_noise(jax.random.key(0), shape, strength=1.0))
  assert plain.shape == offset.shape == shape
  # Per-(example, channel) means: ~N(0, 1/64) without the offset, ~N(0, 1 + 1/64) with it.
  assert plain.mean(axis=(1, 2)).std() < 0.3
  assert offset.mean(axis=(1, 2)).std() > 0.6
  channels_first = S.offset_noise(jax.random.key(0), (4, 3, 8, 8), strength=1.0, channel_axis=1)
  assert channels_first.shape == (4, 3, 8, 8)


# ------------------------------------------------------------------------------------------------
# Sampling trajectories
# ------------------------------------------------------------------------------------------------
NUM_STEPS = 10


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", S.SAMPLERS)
def test_trajectories_match_diffusers(kind, prediction_type, spacing, beta_schedule, monkeypatch):
  config = make_config(beta_schedule, prediction_type, spacing)
  latents, noise = random_inputs(NUM_STEPS)
  stochastic = kind in ("ddpm", "euler_ancestral")
  noise = noise if stochastic else None
  expected = torch_trajectory(kind, config, NUM_STEPS, latents, noise, monkeypatch=monkeypatch)
  actual = jax_trajectory(kind, config, NUM_STEPS, latents, noise)
  assert_trajectories_close(actual, expected, trajectory_rtol(kind, config, NUM_STEPS))


VARIANTS = [  # (id, sampler, config, eta, num_steps)
    ("ddim_eta", "ddim", make_config(), 1.0, 12),
    ("ddim_eta_v_trailing", "ddim", make_config(prediction_type="v_prediction", spacing="trailing"), 0.5, 8),
    ("ddim_trailing_7", "ddim", make_config(spacing="trailing"), 0.0, 7),
    ("ddim_clip_alpha_one", "ddim", make_config("linear", clip_sample=True, clip_sample_range=1.5,
                                                set_alpha_to_one=True), 0.0, 10),
    ("ddim_linspace_sample", "ddim", make_config(prediction_type="sample", spacing="linspace"), 0.0, 7),
    ("ddpm_clip", "ddpm", make_config("linear", clip_sample=True), 0.0, 10),
    ("ddpm_fixed_large", "ddpm", make_config(variance_type="fixed_large"), 0.0, 10),
    ("ddpm_fixed_small_log", "ddpm", make_config(variance_type="fixed_small_log", steps_offset=0), 0.0, 10),
    ("ddpm_sample_linspace", "ddpm", make_config(prediction_type="sample", spacing="linspace"), 0.0, 9),
    ("dpm_linspace_20", "dpmsolver++", make_config(spacing="linspace"), 0.0, 20),
    ("dpm_karras", "dpmsolver++", make_config(spacing="linspace", use_karras_sigmas=True), 0.0, 12),
    ("dpm_karras_v", "dpmsolver++", make_config("linear", "v_prediction", use_karras_sigmas=True), 0.0, 12),
    ("dpm_karras_cosine_v", "dpmsolver++", make_config("squaredcos_cap_v2", "v_prediction",
                                                       use_karras_sigmas=True), 0.0, 12),
    ("dpm_heun_sigma_min", "dpmsolver++", make_config(solver_type="heun", final_sigmas_type="sigma_min"),
     0.0, 9),
    ("dpm_heun_sigma_min_16", "dpmsolver++", make_config(solver_type="heun", final_sigmas_type="sigma_min"),
     0.0, 16),
    ("dpm_order1", "dpmsolver++", make_config(solver_order=1), 0.0, 6),
    ("dpm_sample", "dpmsolver++", make_config(prediction_type="sample"), 0.0, 6),
    ("dpm_zero_snr", "dpmsolver++", make_config(prediction_type="v_prediction", spacing="trailing",
                                                rescale_betas_zero_snr=True), 0.0, 10),
    ("euler_zero_snr", "euler_ancestral", make_config(prediction_type="v_prediction", spacing="trailing",
                                                      rescale_betas_zero_snr=True), 0.0, 10),
    ("euler_linspace", "euler_ancestral", make_config(spacing="linspace"), 0.0, 13),
    ("ddim_zero_snr", "ddim", make_config(prediction_type="v_prediction", spacing="trailing",
                                          rescale_betas_zero_snr=True), 0.0, 10),
]


@pytest.mark.parametrize("kind,config,eta,num_steps", [pytest.param(*v[1:], id=v[0]) for v in VARIANTS])
def test_trajectory_variants(kind, config, eta, num_steps, monkeypatch):
  latents, noise = random_inputs(num_steps, seed=2)
  noise = noise if (kind in ("ddpm", "euler_ancestral") or eta > 0) else None
  expected = torch_trajectory(kind, config, num_steps, latents, noise, eta=eta, monkeypatch=monkeypatch)
  actual = jax_trajectory(kind, config, num_steps, latents, noise, eta=eta)
  assert_trajectories_close(actual, expected, trajectory_rtol(kind, config, num_steps))


def test_full_ddpm_ancestral_chain(monkeypatch):
  """All 1000 training timesteps, the paper's prior-class sampler (num_train_timesteps=1000)."""
  config = make_config(steps_offset=0)
  latents, noise = random_inputs(1000, seed=3)
  expected = torch_trajectory("ddpm", config, 1000, latents, noise, monkeypatch=monkeypatch)
  actual = jax_trajectory("ddpm", config, 1000, latents, noise)
  assert_trajectories_close(actual, expected)


# ------------------------------------------------------------------------------------------------
# The zero-SNR end and other edges: finite everywhere, diffusers' values wherever diffusers' are finite
# ------------------------------------------------------------------------------------------------
RUNS = [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("euler_ancestral", 0.0), ("dpmsolver++", 0.0)]


def grid_config(prediction_type, spacing, rescale, beta_schedule="scaled_linear"):
  # steps_offset 1 with 'leading' would put timestep T at num_steps = T (refused, tested above).
  return make_config(beta_schedule, prediction_type, spacing, rescale_betas_zero_snr=rescale,
                     steps_offset=0 if spacing == "leading" else 1)


# DDIM at eta > 0 on betas rescaled to zero terminal SNR: at the first step 1 - alpha_bar_prev - sigma^2 is
# exactly 0 (ours uses that 0); diffusers computes it as a few f32 ulp either side of 0 and takes its square
# root, which is NaN on the AVX-512 hosts and a finite value ~sqrt(ulp) = 3e-4 off on an AVX2-only CPU (2.2e-4
# relative seen, session 19): torch's kernels round differently there. Its step 0 is compared within this.
ZERO_SNR_ROOT_RTOL = 1e-3


def zero_snr_root_edge(kind, eta, config) -> bool:
  return kind == "ddim" and eta > 0 and bool(config["rescale_betas_zero_snr"])


def assert_equal_where_finite(ours, theirs, rtol, first_step_rtol=None):
  """Ours finite at every step; equal to diffusers' (relative to the step's scale) at every step where
  diffusers' output is finite, step 0 within `first_step_rtol` where given. Returns the number of steps
  where diffusers' is not finite."""
  assert np.isfinite(ours).all(), "non-finite latents"
  broken = 0
  for step, (a, e) in enumerate(zip(ours, theirs)):
    if not np.isfinite(e).all():
      broken += 1
      continue
    bound = first_step_rtol if step == 0 and first_step_rtol is not None else rtol
    err = np.abs(a - e).max() / np.abs(e).max()
    assert err <= bound, f"step {step}: relative error {err:.2e} > {bound:.0e}"
  return broken


def test_ddim_eta1_zero_snr_v_trailing_is_finite_and_diffusers_elsewhere(monkeypatch):
  """Issue 12.4: SD1 betas rescaled to zero terminal SNR, v-prediction, trailing, 10 DDIM steps at
  eta = 1. At the first step (alpha_bar_t = 0) 1 - alpha_bar_prev - sigma^2 = 0 rounds below 0 on the
  AVX-512 hosts and diffusers' sqrt gives NaN, which then fills every later step (above 0 on an AVX2-only
  CPU: finite, ZERO_SNR_ROOT_RTOL off)."""
  config = grid_config("v_prediction", "trailing", rescale=True)
  latents, noise = random_inputs(10, seed=4)
  expected = torch_trajectory("ddim", config, 10, latents, noise, eta=1.0, monkeypatch=monkeypatch)
  # diffusers' own result: every output NaN where its rounded root argument is negative (the AVX-512 hosts),
  # all finite where it is positive (an AVX2-only CPU; ZERO_SNR_ROOT_RTOL)
  diffusers_nan = bool(np.isnan(expected).all())
  assert diffusers_nan or np.isfinite(expected).all()
  plan = S.make_sampler_plan("ddim", S.NoiseSchedule.from_config(config), 10, eta=1.0)
  assert float(plan.coefs["alpha"][0]) == 0 and float(plan.coefs["direction"][0]) == 0  # exactly, not NaN
  ours = jax_trajectory("ddim", config, 10, latents, noise, eta=1.0)
  # Step 0 in closed form: x0 = -v (alpha = 0, sigma = 1), eps unused, the posterior's noise.
  alpha_bar_prev = float(plan.coefs["sqrt_alpha_prev"][0]) ** 2
  v = np.asarray(denoise_jax(jnp.asarray(latents), jnp.float32(plan.timesteps[0])))
  np.testing.assert_allclose(ours[0], np.sqrt(alpha_bar_prev) * -v + np.sqrt(1 - alpha_bar_prev) * noise[0],
                             rtol=1e-5, atol=1e-6)
  theirs = torch_trajectory("ddim", config, 10, latents, noise, 1.0, monkeypatch, restart_from=ours)
  # only step 0 breaks in diffusers, where it is NaN
  assert assert_equal_where_finite(ours, theirs, RTOL, ZERO_SNR_ROOT_RTOL) == int(diffusers_nan)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", pytest.param("squaredcos_cap_v2", marks=pytest.mark.slow)])
def test_plan_coefficients_finite_for_every_step_count(beta_schedule):
  """Host side: every coefficient of every sampler finite, for step counts 1..60 and up to T, every
  spacing, with and without the zero-SNR rescale (DDIM at eta 0 and 1)."""
  counts = list(range(1, 61)) + [64, 100, 128, 250, 333, 500, 999, 1000]
  for (kind, eta), spacing, rescale in itertools.product(RUNS, ["leading", "trailing", "linspace"], [True, False]):
    schedule = S.NoiseSchedule.from_config(grid_config("v_prediction", spacing, rescale, beta_schedule))
    for n in counts:
      plan = S.make_sampler_plan(kind, schedule, n, eta)
      for name, value in plan.coefs.items():
        assert np.isfinite(np.asarray(value)).all(), (kind, eta, spacing, rescale, n, name)
      assert np.isfinite(float(plan.init_noise_sigma))


def test_prediction_conversion_is_finite_at_the_ends():
  x = jnp.asarray([0.5, -2.0])
  out = jnp.asarray([1.5, 0.25])
  for prediction_type in ("epsilon", "sample", "v_prediction"):
    for alpha, sigma in ((0.0, 1.0), (1.0, 0.0), (0.6, 0.8)):
      x0, eps = S.predict_x0_and_eps(prediction_type, x, out, jnp.float32(alpha), jnp.float32(sigma))
      assert np.isfinite(np.asarray(x0)).all() and np.isfinite(np.asarray(eps)).all(), (prediction_type, alpha)
  # Inside (0, 1) the definitions: x = alpha x0 + sigma eps, v = alpha eps - sigma x0.
  x0, eps = S.predict_x0_and_eps("v_prediction", x, out, jnp.float32(0.6), jnp.float32(0.8))
  np.testing.assert_allclose(0.6 * x0 + 0.8 * eps, x, rtol=1e-6)
  np.testing.assert_allclose(0.6 * eps - 0.8 * x0, out, rtol=1e-6)
  x0, eps = S.predict_x0_and_eps("epsilon", x, out, jnp.float32(0.0), jnp.float32(1.0))
  np.testing.assert_allclose(x0, (x - out) / 2.0 ** -12)  # alpha_bar = 2^-24 stands in for 0


def test_min_snr_weight_at_zero_terminal_snr():
  schedule = S.NoiseSchedule.from_config(make_config(rescale_betas_zero_snr=True))
  t = jnp.asarray([0, 500, 999])
  assert float(S.snr(schedule, t)[-1]) == 0
  for prediction_type in ("epsilon", "v_prediction", "sample"):
    weights = np.asarray(S.min_snr_loss_weight(schedule.replace(prediction_type=prediction_type), t, 5.0))
    assert np.isfinite(weights).all(), prediction_type
  # epsilon: min(SNR, gamma) / SNR -> 1 as SNR -> 0; elsewhere the plain formula.
  weights = np.asarray(S.min_snr_loss_weight(schedule, t, 5.0))
  ratio = np.asarray(S.snr(schedule, t[:2]))
  np.testing.assert_allclose(weights, np.append(np.minimum(ratio, 5.0) / ratio, 1.0), rtol=1e-6)


def _grid_trajectories(kind, eta, prediction_type, num_steps, latents, noise, configs):
  """Our trajectories for several configs of one shape, one compile (plans stacked and vmapped)."""
  plans = [S.make_sampler_plan(kind, S.NoiseSchedule.from_config(c), num_steps, eta) for c in configs]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *plans)
  run = jax.vmap(lambda plan: S.run_sampler(plan, denoise_jax, jnp.asarray(latents), noise=noise,
                                            return_trajectory=True)[1])
  return np.asarray(jax.jit(run)(stacked))


def _check_grid(num_steps, monkeypatch, compare):
  configs = [grid_config(p, s, r) for p in ("epsilon", "v_prediction")
             for s in ("leading", "trailing", "linspace") for r in (True, False)]
  latents, noise = random_inputs(num_steps, seed=5)
  broken = 0
  for kind, eta in RUNS:
    stochastic = kind in ("ddpm", "euler_ancestral") or eta > 0
    step_noise = jnp.asarray(noise) if stochastic else None
    for prediction_type in ("epsilon", "v_prediction"):
      group = [c for c in configs if c["prediction_type"] == prediction_type]
      trajectories = _grid_trajectories(kind, eta, prediction_type, num_steps, latents, step_noise, group)
      for config, ours in zip(group, trajectories):
        where = (kind, eta, num_steps, config["timestep_spacing"], config["rescale_betas_zero_snr"],
                 prediction_type)
        assert np.isfinite(ours).all(), where
        if compare:
          theirs = torch_trajectory(kind, config, num_steps, latents, noise if stochastic else None, eta,
                                    monkeypatch, restart_from=ours)
          broken += assert_equal_where_finite(ours, theirs, trajectory_rtol(kind, config, num_steps),
                                              ZERO_SNR_ROOT_RTOL if zero_snr_root_edge(kind, eta, config) else None)
  return broken


def test_grid_finite_and_equal_to_diffusers_where_it_is_finite(monkeypatch):
  """Samplers x {epsilon, v} x spacings x {zero-SNR rescale, plain} at 10 steps: ours finite, diffusers'
  one-step results equal wherever finite. diffusers breaks at the zero-SNR end: DDIM/DDPM with
  epsilon divide by sqrt(alpha_bar) = 0, DDIM at eta = 1 takes the root of a rounded-negative number."""
  assert _check_grid(10, monkeypatch, compare=True) > 0  # the grid reaches diffusers' failures


@pytest.mark.slow
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 25, 50, 333, 1000])
def test_grid_finite_at_other_step_counts(num_steps, monkeypatch):
  _check_grid(num_steps, monkeypatch, compare=num_steps <= 50)


# ------------------------------------------------------------------------------------------------
# Guidance, jit, rng and errors
# ------------------------------------------------------------------------------------------------
def test_guided_denoise_fn_one_batched_call():
  calls = []

  def model_fn(x, t, context):  # x [N, H, W, C], t [N], context [N, L, D]
    calls.append(x.shape[0])
    return x * context.mean(axis=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000.0

  x = jnp.asarray(np.random.default_rng(0).standard_normal(LATENT_SHAPE), jnp.float32)
  cond = jnp.asarray([[[1.0, 2.0]], [[3.0, 5.0]]])  # [B=2, L=1, D=2]
  uncond = jnp.zeros((1, 1, 2))  # one empty-prompt embedding, broadcast over the batch
  t = jnp.float32(500.0)
  guided = S.guided_denoise_fn(model_fn, cond, uncond, 7.5)(x, t)
  assert calls == [4]
  out_cond = model_fn(x, jnp.full((2,), t), cond)
  out_uncond = model_fn(x, jnp.full((2,), t), jnp.zeros((2, 1, 2)))
  np.testing.assert_allclose(guided, out_uncond + 7.5 * (out_cond - out_uncond), rtol=1e-6)
  calls.clear()
  unguided = S.guided_denoise_fn(model_fn, cond, uncond, 1.0)(x, t)
  assert calls == [2]
  np.testing.assert_allclose(unguided, out_cond, rtol=1e-6)


@pytest.mark.parametrize("kind", S.SAMPLERS)
def test_sample_jits_with_rng_and_keeps_dtype(kind):
  schedule = S.NoiseSchedule.from_config(make_config(prediction_type="v_prediction"))

  @jax.jit
  def run(latents, rng, guidance):
    def model_fn(x, t, context):
      return denoise_jax(x, t[0]) * context[:, :1, :1, None]
    denoise = S.guided_denoise_fn(model_fn, jnp.ones((2, 1, 1)), jnp.zeros((1, 1, 1)), guidance)
    return S.sample(kind, schedule, denoise, latents, 4, rng)

  latents = jnp.asarray(random_inputs(1)[0], jnp.bfloat16)
  first = run(latents, jax.random.key(1), 3.0)
  again = run(latents, jax.random.key(1), 3.0)
  other = run(latents, jax.random.key(2), 3.0)
  assert first.shape == LATENT_SHAPE and first.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(first, np.float32)))
  np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(again, np.float32))
  if kind in ("ddpm", "euler_ancestral"):
    assert not np.array_equal(np.asarray(first, np.float32), np.asarray(other, np.float32))


def test_sampler_records_agree_with_their_diffusers_classes():
  """Each record's diffusers class, default spacing and own config keys are that class's."""
  import inspect
  for name, sampler in S.SAMPLERS.items():
    assert S.get_sampler(sampler.short_name) is S.get_sampler(name) is sampler
    cls = getattr(diffusers, sampler.diffusers_class)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    assert defaults["timestep_spacing"] == sampler.default_spacing, name
    for key in sampler.options:
      assert key in defaults and key in {f.name for f in dataclasses.fields(S.NoiseSchedule)}, (name, key)
      assert getattr(S.NoiseSchedule.from_config({}), key) == defaults[key], (name, key)
  with pytest.raises(ValueError, match="unknown sampler 'euler'; did you mean 'euler_a'"):
    S.get_sampler("euler")


def test_schedule_is_static_and_hashable():
  a = S.NoiseSchedule.from_config(make_config())
  b = S.NoiseSchedule.from_config(make_config())
  assert a == b and hash(a) == hash(b)
  assert a != a.replace(prediction_type="v_prediction")
  assert jax.tree_util.tree_leaves(a) == []
  traced = jax.jit(lambda schedule, t: S.snr(schedule, t))(a, jnp.array([10, 500]))
  np.testing.assert_allclose(traced, S.snr(a, jnp.array([10, 500])))


@pytest.mark.parametrize("config,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing='uniform'"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({"thresholding": True}, "thresholding"),
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"solver_order": 3}, "solver_order=3"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
])
def test_bad_config_errors(config, match):
  with pytest.raises(ValueError, match=match):
    S.NoiseSchedule.from_config(config)


def test_bad_sampling_arguments():
  schedule = S.NoiseSchedule.from_config(make_config())
  latents = jnp.zeros(LATENT_SHAPE)
  with pytest.raises(ValueError, match="unknown sampler 'plms'"):
    S.sample("plms", schedule, denoise_jax, latents, 10)
  with pytest.raises(ValueError, match="num_steps=0"):
    S.sample("ddim", schedule, denoise_jax, latents, 0)
  with pytest.raises(ValueError, match="num_steps=2000"):
    S.sample("ddim", schedule, denoise_jax, latents, 2000)
  with pytest.raises(ValueError, match="stochastic"):
    S.sample("ddpm", schedule, denoise_jax, latents, 10)
  with pytest.raises(ValueError, match="noise has shape"):
    S.sample("euler_ancestral", schedule, denoise_jax, latents, 10, noise=jnp.zeros((9,) + LATENT_SHAPE))
  with pytest.raises(ValueError, match="eta=0.5 only applies"):
    S.sample("dpmsolver++", schedule, denoise_jax, latents, 10, eta=0.5)
