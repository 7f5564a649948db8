"""A tiny, untrained Mixtral-format model built on the fly: the stand-in default of ``moe generate``
while no trained default model is embedded in ``moe/assets/default/``.

Everything is deterministic: the tokenizer is a byte-level BPE trained with ``tokenizers`` on the
source text of a few modules of Python's own standard library, and the weights are drawn from a
seeded ``torch.Generator``. The directory is a plain Hugging Face checkpoint (``config.json``,
``model.safetensors`` with the per-expert ``w1/w2/w3`` tensor names, ``tokenizer.json``,
``tokenizer_config.json``, ``generation_config.json``), so it also exercises the real loader.
It is written once into a cache directory (``$MOEFLOW_CACHE_DIR`` or ``~/.cache/moeflow``),
atomically, so concurrent builders never see a half-written model.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# bump when the recipe changes: the cache directory name includes it
RECIPE_VERSION = 1
ASSETS_DEFAULT = Path(__file__).resolve().parent / "assets" / "default"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model (a few hundred thousand parameters: loads in milliseconds)."""
    vocab_size: int = 512  # BPE target; the real size is whatever the trainer reaches (<= this)
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "seed" and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"TinySpec.{name}={value!r} must be a positive int")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"TinySpec.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"TinySpec.num_attention_heads ({self.num_attention_heads}) must be divisible "
                             f"by num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"TinySpec.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                             f"num_local_experts ({self.num_local_experts})")


def training_text() -> str:
    """A few tens of KB of Python source from the standard library (identical for a given Python)."""
    import json.decoder
    import string
    import textwrap

    return "\n".join(inspect.getsource(m) for m in (textwrap, string, json.decoder))


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) with <s>, </s>, <pad> and a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = training_text()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def _weights(spec: TinySpec, vocab: int) -> dict[str, torch.Tensor]:
    """Random Mixtral weights with Hugging Face names (per-expert layout), float32."""
    g = torch.Generator().manual_seed(spec.seed)
    D, I, E = spec.hidden_size, spec.intermediate_size, spec.num_local_experts
    hd = D // spec.num_attention_heads
    kv = spec.num_key_value_heads * hd

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, D, std=1.0)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(D)
        w[p + "post_attention_layernorm.weight"] = torch.ones(D)
        w[p + "self_attn.q_proj.weight"] = normal(D, D, std=D ** -0.5)
        w[p + "self_attn.k_proj.weight"] = normal(kv, D, std=D ** -0.5)
        w[p + "self_attn.v_proj.weight"] = normal(kv, D, std=D ** -0.5)
        w[p + "self_attn.o_proj.weight"] = normal(D, D, std=D ** -0.5)
        w[p + "block_sparse_moe.gate.weight"] = normal(E, D, std=D ** -0.5)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = normal(I, D, std=D ** -0.5)
            w[q + "w3.weight"] = normal(I, D, std=D ** -0.5)
            w[q + "w2.weight"] = normal(D, I, std=I ** -0.5)
    w["model.norm.weight"] = torch.ones(D)
    # a larger output scale than the usual 0.02 so that greedy text is not one repeated token
    w["lm_head.weight"] = normal(vocab, D, std=0.5)
    return w


def _config(spec: TinySpec, vocab: int, bos: int, eos: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // spec.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "num_local_experts": spec.num_local_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "router_aux_loss_coef": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "moeflow_note": "tiny untrained model built on the fly by moe.tiny; its text is random",
    }


def write_tiny_model(path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write the tiny model into ``path`` (created; existing files there are overwritten)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.vocab_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2))
    (out / "config.json").write_text(json.dumps(_config(spec, vocab, bos, eos), indent=2))
    save_file(_weights(spec, vocab), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def cache_root() -> Path:
    env = os.environ.get("MOEFLOW_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moeflow"


def tiny_model_dir(spec: TinySpec = TinySpec(), cache_dir: str | Path | None = None) -> Path:
    """Where the tiny model for ``spec`` lives: ``<cache_dir>/tiny-<hash>``, the hash covering the
    recipe, the spec and the Python version (the training text is the standard library's source)."""
    key = json.dumps({"recipe": RECIPE_VERSION, "python": sys.version_info[:2], **asdict(spec)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / f"tiny-{digest}"


def ensure_tiny_model(spec: TinySpec = TinySpec(), cache_dir: str | Path | None = None) -> Path:
    """The tiny model's directory, building it first if it is not complete there."""
    target = tiny_model_dir(spec, cache_dir)
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary readable directory
    try:
        write_tiny_model(tmp, spec)
        if target.exists():
            shutil.rmtree(target)  # incomplete (checked above), e.g. left by a crash: replace it
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another builder: theirs is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny(device: torch.device | str = "cpu", dtype: torch.dtype | None = None, backend: str = "torch",
               cache_dir: str | Path | None = None, progress=None):
    """(model, tokenizer) of the tiny model, built into the cache first if needed."""
    from .checkpoint import load_model
    from .tokenizer import Tokenizer

    path = ensure_tiny_model(cache_dir=cache_dir)
    model = load_model(path, dtype=dtype, device=device, backend=backend, progress=progress)
    return model, Tokenizer.from_dir(path)


def default_model_is_embedded() -> bool:
    return (ASSETS_DEFAULT / "config.json").is_file()


__all__ = ["TinySpec", "write_tiny_model", "ensure_tiny_model", "build_tiny", "tiny_model_dir", "build_tokenizer",
           "default_model_is_embedded", "ASSETS_DEFAULT", "CHAT_TEMPLATE"]
