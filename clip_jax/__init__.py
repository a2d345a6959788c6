"""clip_jax: CLIP models, losses, data, training and evaluation in JAX/Flax."""
from clip_jax.models import CLIP, MODEL_CONFIGS, CLIPConfig, create_model, init_variables, l2_normalize
from clip_jax.convert import export_hf, load_checkpoint
from clip_jax.preprocess import preprocess
from clip_jax.tokenizer import ClipTokenizer, SentencePieceTokenizer, get_tokenizer, tokenize
