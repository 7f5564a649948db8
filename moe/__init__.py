"""The MoE model core: config, decoder model, checkpoint loading, generation, training, CLI."""
from .checkpoint import CheckpointError, load_model, save_pretrained
from .config import MoEConfig
from .model import MoEForCausalLM

__all__: list[str] = [
    "MoEConfig",
    "MoEForCausalLM",
    "load_model",
    "save_pretrained",
    "CheckpointError",
]
