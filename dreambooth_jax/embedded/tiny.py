"""A tiny Stable Diffusion of the real architecture, with fresh random weights: the stand-in
for a downloaded checkpoint in tests and the starting point of the embedded default."""
from __future__ import annotations

import flax.linen as nn
import jax

from clip_jax.tokenizer import ClipTokenizer
from dreambooth_jax.sampling import pipeline as sd
from dreambooth_jax.models import text_encoder as text_encoder_lib
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.unet import init_inputs as unet_inputs
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig
from dreambooth_jax.models.vae import init_inputs as vae_inputs

# SD 1.x's scheduler (scaled_linear betas, epsilon targets); 'v_prediction' for an SD 2.x-like model.
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                "timestep_spacing": "leading"}


def tiny_configs(image_size: int = 32, text_width: int = 32, context_length: int = 16, text_layers: int = 2,
                 text_heads: int = 2, text_act: str = "quick_gelu"):
  """UNet, VAE (downscale 4) and text-encoder configs small enough for a CPU test. The text fields
  can match a small CLIP's text tower (e.g. the digits CLIP's: width 64, context 32, exact GELU), so
  that tower's weights can initialise the encoder (`dreambooth_jax.embedded.pretrain`, text_init)."""
  unet = UNetConfig.from_diffusers({
      "sample_size": image_size // 4, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
      "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": text_width,
      "attention_head_dim": 8, "norm_num_groups": 8})
  vae = VAEConfig.from_diffusers({
      "block_out_channels": [16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 3,
      "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "latent_channels": 4,
      "norm_num_groups": 8, "sample_size": image_size, "force_upcast": False})
  text = {"vocab_size": 49408, "hidden_size": text_width, "intermediate_size": 4 * text_width,
          "num_attention_heads": text_heads, "num_hidden_layers": text_layers,
          "max_position_embeddings": context_length, "hidden_act": text_act, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
  return unet, vae, text


def make_tiny_pipeline(rng: jax.Array, image_size: int = 32, prediction_type: str = "epsilon",
                       **config_kwargs) -> sd.StableDiffusion:
  unet_config, vae_config, text_config = tiny_configs(image_size, **config_kwargs)
  unet, vae = UNet2DConditionModel(unet_config), AutoencoderKL(vae_config)
  text_encoder, text_hf = text_encoder_lib.create_text_encoder(text_config)
  unet_rng, vae_rng, text_rng = jax.random.split(rng, 3)
  init = lambda module, *args: jax.jit(module.init)(*args)["params"]  # noqa: E731
  params = nn.meta.unbox({"unet": init(unet, unet_rng, *unet_inputs(unet_config)),
                          "vae": init(vae, vae_rng, *vae_inputs(vae_config)),
                          "text_encoder": jax.jit(text_encoder_lib.init_params, static_argnums=0)(
                              text_encoder, text_rng)})
  tokenizer = ClipTokenizer.from_bpe_file(context_length=text_encoder.context_length)
  tokenizer.pad_token_id = tokenizer.eot_token_id  # SD 1.x pads with the end token
  return sd.StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, params=jax.device_get(params),
                            tokenizer=tokenizer,
                            scheduler_config=dict(SD_SCHEDULER, prediction_type=prediction_type),
                            vae_scaling_factor=float(vae_config.scaling_factor), text_encoder_config=text_hf)
