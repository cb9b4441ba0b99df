"""Training: adapt a pretrained AR checkpoint into a Fast-dLLM v2 block-diffusion model
(paper §3.2), or train autoregressively, from one YAML config (see docs/training.md)."""

from .config import TrainConfig
from .config_file import config_from_dict, load_train_config
from .trainer import Trainer, run_training

__all__ = ["TrainConfig", "Trainer", "config_from_dict", "load_train_config", "run_training"]
