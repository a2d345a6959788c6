"""CLIP towers as Flax Linen modules."""
from clip_jax.models.clip import CLIP, create_model, init_variables, l2_normalize
from clip_jax.models.configs import MODEL_CONFIGS, CLIPConfig, TextConfig, VisionConfig, get_config
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer
