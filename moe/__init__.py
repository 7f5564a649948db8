"""The MoE model core: config, decoder model, checkpoint loading, generation, training, CLI."""
from .checkpoint import CheckpointError, load_model, save_pretrained
from .config import MoEConfig
from .model import MoEForCausalLM
from .generate import Engine, RequestOutput, generate, stream
from .sampling import SamplingParams
from .tokenizer import Tokenizer, TokenizerError

__all__: list[str] = [
    "MoEConfig",
    "MoEForCausalLM",
    "load_model",
    "save_pretrained",
    "CheckpointError",
    "Tokenizer",
    "TokenizerError",
    "SamplingParams",
    "Engine",
    "RequestOutput",
    "generate",
    "stream",
]
