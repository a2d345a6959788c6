"""Evaluation that reproduces the CLIP paper's tables: zero-shot classification, image-text
retrieval and linear probes, sharded over all devices, with the paper's numbers beside ours."""
from clip_jax.eval.classnames import DATASETS, DatasetInfo, find_dataset
from clip_jax.eval.embed import ImageFeatures, Subset, embed_images, embed_texts, global_batch_size, image_batches
from clip_jax.eval.zeroshot import (ZeroShotEvaluator, build_training_evaluators, classify, confusion_matrix,
                                    confusion_matrix_png, ensemble_classifier, zeroshot_classifier)
from clip_jax.eval.linear_probe import ProbeResult, evaluate_linear_probe, fit_linear_probe
from clip_jax.eval.paper_results import PAPER_RESULTS, paper_model, paper_number
from clip_jax.eval.retrieval import CaptionFileSource, evaluate_retrieval, retrieval_metrics
