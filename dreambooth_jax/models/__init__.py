"""Stable Diffusion networks in Flax: UNet, VAE, text encoder, and the diffusers-format converters."""
