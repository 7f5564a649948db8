"""`moe train`: train an MoE language model of any supported family on a text corpus.

    moe corpus data/stdlib                                   # corpus + tokenizer (moe/corpus.py)
    moe train --config moe/recipes/default.json --data data/stdlib --out runs/default
    moe train --init runs/default/final --data more.txt --out runs/more       # continue a checkpoint
    moe train --config ... --out runs/default --resume                        # after an interruption
    moe train --eval-only --init runs/default/final --data data/stdlib       # held-out loss only

A recipe is a JSON file ``{"model": <Hugging Face config.json dict>, "train": {TrainConfig
fields}}`` (a bare config.json also works); command-line flags override its "train" part.
``--data`` is a corpus directory from ``moe corpus`` (train.txt, heldout.txt, tokenizer/) or any
file/directory of text (then pass --eval-data and --tokenizer).

Objective = cross entropy + lb_coef * load-balancing loss + z_coef * router z-loss, the aux
terms collected through hooks on the routers of ``model.moe_blocks()`` (moe/losses.py), which
also apply jitter, the capacity factor and DeepSeek-V3 bias balancing. Mixed precision: float32
weights and AdamW state, bf16 autocast on CUDA. Cosine schedule with linear warm-up.

Output directory:
    checkpoint-<step>/   model (float32, HF format) + tokenizer + trainer_state.json +
                         optimizer.safetensors + rng.safetensors   (the last `keep` are kept)
    final/               model in save_dtype (bf16 by default) + tokenizer: what ships
    metrics.json         summary (losses, tokens/s, load balance, sizes); log.jsonl: one line per log

Shape legend: B = batch rows, S = sequence length, V = vocabulary, E = experts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import EOS_TEXT, add_corpus_arguments, load_token_ids, run_corpus_command
from .losses import BalanceConfig, RouterAuxCollector, balance_stats

_FIT_FROM, _FIT_AT = 5, 25  # steps between which the time budget measures the step time
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class TrainConfig:
    """Settings of one training run (recipe "train" section; flags override)."""
    max_steps: int = 1000
    batch_size: int = 16           # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    init_std: float = 0.02
    eval_every: int = 200          # 0 = only at the end
    eval_tokens: int = 262144      # held-out tokens evaluated (0 = all)
    save_every: int = 0            # 0 = only at the end
    keep: int = 2                  # checkpoints kept
    log_every: int = 10
    precision: str = "auto"        # "bf16" autocast | "fp32" | "auto" (bf16 on CUDA)
    save_dtype: str = "bfloat16"   # dtype of final/
    backend: str = "torch"         # expert kernel backend
    max_minutes: float = 0.0       # >0: at step 25, shrink max_steps once to fit this budget; stop early if
                                   # the steps get slower, so final/ is written within it anyway
    # routing during training (moe.losses.BalanceConfig)
    lb_coef: float = 0.01
    z_coef: float = 0.001
    bias_rate: float = 0.0
    jitter_eps: float = 0.0
    capacity_factor: float = 0.0

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_tokens", "save_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")
        self.balance()  # validates the routing settings

    def balance(self) -> BalanceConfig:
        return BalanceConfig(lb_coef=self.lb_coef, z_coef=self.z_coef, bias_rate=self.bias_rate,
                             jitter_eps=self.jitter_eps, capacity_factor=self.capacity_factor)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_recipe(path: str | Path) -> tuple[dict, dict]:
    """(model config dict, train settings dict) of a recipe JSON (or a bare config.json)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe {p} does not exist; see moe/recipes/ for examples")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"recipe {p} is not valid JSON: {e}") from e
    if "model" in d:
        return dict(d["model"]), dict(d.get("train", {}))
    if "model_type" in d:
        return d, {}
    raise ValueError(f"recipe {p} has neither a 'model' section nor a 'model_type': "
                     "write {\"model\": {...config.json...}, \"train\": {...}}")


# --- data -----------------------------------------------------------------------------------------
@dataclass
class CorpusPaths:
    train: Path
    heldout: Path | None
    tokenizer: Path


def resolve_corpus(data: str, eval_data: str | None, tokenizer: str | None, init: str | None) -> CorpusPaths:
    """Where the training text, held-out text and tokenizer are (see the module docstring)."""
    d = Path(data)
    if d.is_dir() and (d / "train.txt").is_file():
        train, heldout = d / "train.txt", d / "heldout.txt"
        heldout = heldout if heldout.is_file() else None
        tok_default = d / "tokenizer"
    else:
        train, heldout, tok_default = d, None, None
    if eval_data:
        heldout = Path(eval_data)
    if tokenizer:
        tok = Path(tokenizer)
    elif init and (Path(init) / "tokenizer.json").is_file():
        tok = Path(init)
    elif tok_default is not None and (tok_default / "tokenizer.json").is_file():
        tok = tok_default
    else:
        raise ValueError(f"no tokenizer found for corpus {data}: pass --tokenizer DIR (with tokenizer.json), "
                         "or build the corpus with `moe corpus OUT` which trains one")
    return CorpusPaths(train, heldout, tok)


class TokenStream:
    """A corpus as one long token array; random windows for training, fixed ones for eval."""

    def __init__(self, ids: torch.Tensor, device: torch.device):
        self.ids = ids.to(device=device, dtype=torch.long)

    def __len__(self) -> int:
        return self.ids.numel()

    def check(self, seq_len: int, what: str) -> None:
        if len(self) < seq_len + 2:
            raise ValueError(f"{what} corpus has {len(self)} tokens, fewer than seq_len+2 ({seq_len + 2}); "
                             "use a larger corpus or a smaller --seq-len")

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (inputs_BS, targets_BS); offsets come from the CPU generator `gen`."""
        off_B = torch.randint(0, len(self) - seq_len - 1, (batch,), generator=gen).to(self.ids.device)
        idx_BS = off_B[:, None] + torch.arange(seq_len + 1, device=self.ids.device)
        win = self.ids[idx_BS]
        return win[:, :-1], win[:, 1:]

    def eval_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """Consecutive non-overlapping windows [N, S+1] from the start (deterministic)."""
        n = (len(self) - 1) // seq_len
        if max_tokens:
            n = min(n, max(1, max_tokens // seq_len))
        starts = torch.arange(n, device=self.ids.device) * seq_len
        return self.ids[starts[:, None] + torch.arange(seq_len + 1, device=self.ids.device)]


# --- model ----------------------------------------------------------------------------------------
def init_weights_(model: torch.nn.Module, std: float, num_layers: int, seed: int) -> None:
    """Initialise a model built from scratch: normal(std) for matrices (output projections scaled
    by 1/sqrt(2 * layers), GPT-2 style, so the residual stream does not grow with depth), ones for
    norm weights, zeros for biases and the routers' correction bias."""
    gen = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                s = out_std if name.endswith(("o_proj.weight", "down_proj.weight", "w2")) else std
                p.copy_(torch.randn(p.shape, generator=gen).mul_(s).to(p.dtype))
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


def build_model(model_dict: dict | None, init: str | None, tokenizer_dir: Path, cfg: TrainConfig,
                device: torch.device):
    """A float32 model: loaded from `init`, or built from `model_dict` and initialised."""
    from .checkpoint import load_model
    from .config import MoEConfig
    from .model import MoEForCausalLM
    if init:
        return load_model(init, dtype=torch.float32, device=str(device), backend=cfg.backend)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TEXT)
    d = dict(model_dict)
    vocab = tok.get_vocab_size()
    if d.get("vocab_size", vocab) < vocab:
        raise ValueError(f"the recipe's vocab_size ({d['vocab_size']}) is smaller than the tokenizer's ({vocab}); "
                         "raise vocab_size or train a smaller tokenizer (moe corpus --vocab-size)")
    d.setdefault("vocab_size", vocab)
    if eos is not None:
        d["eos_token_id"] = eos
        d["bos_token_id"] = eos
    d.pop("torch_dtype", None)
    d["dtype"] = "float32"
    mcfg = MoEConfig.from_hf_dict(d)
    torch.manual_seed(cfg.seed)
    model = MoEForCausalLM(mcfg, backend=cfg.backend)
    init_weights_(model, cfg.init_std, mcfg.num_hidden_layers, cfg.seed)
    return model.to(device)


def parameter_counts(model) -> dict[str, int]:
    """Total parameters and the ones active per token (top-k of the routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for block in model.moe_blocks():
        experts = block.experts
        E = experts.w13.shape[0]
        k = block.router.top_k
        per_expert = (experts.w13.numel() + experts.w2.numel()) // E
        inactive += (E - k) * per_expert
    return {"total": total, "active": total - inactive}


def _autocast(device: torch.device, cfg: TrainConfig):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def mixed_precision_experts(model) -> list:
    """Under autocast, run each layer's expert function wholly in the autocast dtype.

    Autocast does not reach inside the expert function: the residual stream stays float32 while
    its matmuls would give bf16 (the torch reference then mixes dtypes in its index_add), and the
    Triton backend needs x and the weights in one dtype. So x, w13 and w2 are cast first; the
    weight casts are differentiable, so gradients still reach the float32 master weights. The
    patch is an instance attribute (state_dict and checkpoints are untouched); undo it with
    ``restore_experts``. Expert modules without w13/w2/backend (offload's) are left alone.
    """
    import kernels

    patched = []
    for block in model.moe_blocks():
        ex = block.experts
        if not all(hasattr(ex, a) for a in ("w13", "w2", "backend")) or "forward" in ex.__dict__:
            continue  # not ours to patch, or patched already (evaluate() inside train())

        def forward(x_TD, topk_ids_TK, topk_weights_TK, ex=ex):
            dt = _autocast_dtype(x_TD)
            if dt is None:
                return type(ex).forward(ex, x_TD, topk_ids_TK, topk_weights_TK)
            fn = kernels.get_backend(ex.backend)
            with torch.autocast(x_TD.device.type, enabled=False):
                return fn(x_TD.to(dt), ex.w13.to(dt), ex.w2.to(dt), topk_ids_TK, topk_weights_TK)

        ex.forward = forward
        patched.append(ex)
    return patched


def restore_experts(patched: list) -> None:
    for ex in patched:
        if "forward" in ex.__dict__:
            del ex.forward


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))


@torch.no_grad()
def evaluate(model, stream: TokenStream, cfg: TrainConfig, device: torch.device) -> float:
    """Mean cross entropy (nats/token) over the fixed held-out windows."""
    was_training = model.training
    model.eval()
    patched = mixed_precision_experts(model)
    win = stream.eval_windows(cfg.seq_len, cfg.eval_tokens)
    total, count = 0.0, 0
    for i in range(0, win.shape[0], cfg.batch_size):
        w = win[i:i + cfg.batch_size]
        with _autocast(device, cfg):
            logits = model(w[:, :-1])
        n = w[:, 1:].numel()
        total += float(lm_loss(logits, w[:, 1:])) * n
        count += n
    restore_experts(patched)
    model.train(was_training)
    return total / max(1, count)


# --- checkpoints ----------------------------------------------------------------------------------
def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _optimizer_tensors(opt: torch.optim.Optimizer, names: dict) -> dict[str, torch.Tensor]:
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[p]}::{k}"] = v.detach().to("cpu").contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return out


def _rng_tensors(gens: dict[str, torch.Generator], device: torch.device) -> dict[str, torch.Tensor]:
    out = {f"gen::{k}": g.get_state() for k, g in gens.items()}
    out["torch_cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def save_checkpoint(out: Path, step: int, model, opt, gens, state: dict, tok_dir: Path, cfg: TrainConfig,
                    device: torch.device) -> Path:
    """checkpoint-<step>/ with the float32 model, optimizer, RNG and trainer state; keeps `keep`."""
    from safetensors.torch import save_file

    from .checkpoint import save_pretrained
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp)
    _copy_tokenizer(tok_dir, tmp)
    names = {p: n for n, p in model.named_parameters()}
    save_file(_optimizer_tensors(opt, names), str(tmp / "optimizer.safetensors"))
    save_file(_rng_tensors(gens, device), str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint directory exists only once complete
    for old in list_checkpoints(out)[:-cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def restore_checkpoint(ckpt: Path, model, opt, gens, device: torch.device) -> dict:
    from safetensors.torch import load_file
    names = {n: p for n, p in model.named_parameters()}
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pname, field_name = key.split("::")
        if pname not in names or names[pname] not in index:
            raise ValueError(f"{ckpt}/optimizer.safetensors holds state of unknown parameter {pname!r}; "
                             "the checkpoint belongs to a different model")
        state.setdefault(index[names[pname]], {})[field_name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)  # torch places each value (the fused kernel's step counters included)
    rng = load_file(str(ckpt / "rng.safetensors"))
    for k, g in gens.items():
        g.set_state(rng[f"gen::{k}"])
    torch.set_rng_state(rng["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
    return json.loads((ckpt / "trainer_state.json").read_text())


def export_model(model, path: Path, dtype: str, tok_dir: Path) -> int:
    """The shipping copy: the model in `dtype` + tokenizer. Returns the weights' bytes on disk."""
    import copy

    from .checkpoint import save_pretrained
    path.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(device="cpu", dtype=getattr(torch, dtype))
    save_pretrained(m, path)  # config.json's dtype follows the weights'
    _copy_tokenizer(tok_dir, path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --- progress -------------------------------------------------------------------------------------
class Progress:
    """One status line: step, loss, tokens/s, expert-load balance; a tty redraws it in place."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, fields: dict) -> None:
        width = 24
        done = int(width * step / max(1, self.total))
        bar = "#" * done + "-" * (width - done)
        text = f"[{bar}] {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- the loop -------------------------------------------------------------------------------------
def _make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


def train(cfg: TrainConfig, out: str | Path, data: str, *, model_dict: dict | None = None, init: str | None = None,
          eval_data: str | None = None, tokenizer: str | None = None, device: str = "auto",
          resume: bool = False, quiet: bool = False) -> dict:
    """Run a training job; returns the metrics written to out/metrics.json."""
    if (model_dict is None) == (init is None):
        raise ValueError("give exactly one of a recipe (--config) or a checkpoint to continue (--init)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    out = Path(out)
    existing = list_checkpoints(out) if out.is_dir() else []
    if existing and not resume:
        raise ValueError(f"{out} already holds {existing[-1].name}; pass --resume to continue it "
                         "or choose a new --out")
    paths = resolve_corpus(data, eval_data, tokenizer, init)
    t_load = time.time()
    train_ids = TokenStream(load_token_ids(paths.tokenizer, paths.train), dev)
    train_ids.check(cfg.seq_len, "training")
    heldout = TokenStream(load_token_ids(paths.tokenizer, paths.heldout), dev) if paths.heldout else None
    if heldout is not None:
        heldout.check(cfg.seq_len, "held-out")
    tokenize_s = time.time() - t_load

    start_from = str(existing[-1]) if (resume and existing) else init
    model = build_model(model_dict, start_from, paths.tokenizer, cfg, dev)
    model.train()
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):  # moved by the bias rule, never by gradients
            p.requires_grad_(False)
    opt = _make_optimizer(model, cfg, dev)
    gens = {"data": torch.Generator().manual_seed(cfg.seed)}
    jitter_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    gens["jitter"] = jitter_gen
    state = {"tokens": 0, "train_seconds": 0.0, "evals": [], "max_steps": cfg.max_steps}
    step = 0
    if resume and existing:
        state = restore_checkpoint(existing[-1], model, opt, gens, dev)
        step = state["step"]
        cfg.max_steps = state.get("max_steps", cfg.max_steps)
    collector = RouterAuxCollector(model, cfg.balance(), generator=jitter_gen)
    patched = mixed_precision_experts(model)
    counts = parameter_counts(model)
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    bar = None if quiet else Progress(cfg.max_steps)
    if not quiet:
        print(f"train: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
              f"{len(train_ids) / 1e6:.2f}M training tokens, {cfg.tokens_per_step} tokens/step, "
              f"device {dev}, backend {cfg.backend}", file=sys.stderr)

    loss_hist: list[torch.Tensor] = []
    balance_hist: dict[str, float] = {}
    window_tokens, window_t0 = 0, time.time()
    tok_per_s = 0.0
    fit_t0 = 0.0
    # max_minutes: everything after loading the data (steps, evaluations, checkpoints, final/) ends by the deadline;
    # 10 s are set aside for the export and the last save
    deadline = t_load + cfg.max_minutes * 60 - 10.0
    per_step, eval_s = 0.0, 0.0  # measured: a step (from the fit on), the longest evaluation so far
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss, aux_vals = torch.zeros((), device=dev), []
        for _ in range(cfg.grad_accum):
            x, y = train_ids.sample(cfg.batch_size, cfg.seq_len, gens["data"])
            with _autocast(dev, cfg):
                logits = model(x)
            loss = lm_loss(logits, y)
            aux = collector.collect()
            total = loss + aux.loss(collector.cfg)
            (total / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum  # stays on the device: no sync per step
            aux_vals.append(aux)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        collector.update_bias()
        step += 1
        state["tokens"] += cfg.tokens_per_step
        window_tokens += cfg.tokens_per_step
        loss_hist.append(step_loss)
        del loss_hist[:-20]  # the reported train loss is the mean of the last 20 steps
        if cfg.max_minutes > 0 and not resume and step == _FIT_FROM:
            sync()
            fit_t0 = time.time()  # steps before this one include warm-up (allocator, cuBLAS, ...)
        if cfg.max_minutes > 0 and not resume and step == _FIT_AT:
            # fit the budget once, early, so the cosine schedule still ends at the last step
            sync()
            per_step = (time.time() - fit_t0) / (_FIT_AT - _FIT_FROM)
            budget = deadline - time.time()
            fit = step + int(budget / (per_step * 1.1))  # 10% reserve for evaluations and checkpoints
            if fit < cfg.max_steps:
                cfg.max_steps = max(step + 1, fit)
                state["max_steps"] = cfg.max_steps
                if bar:
                    bar.total = cfg.max_steps
                if not quiet:
                    print(f"\ntrain: {per_step * 1e3:.0f} ms/step; max_steps cut to {cfg.max_steps} to fit "
                          f"{cfg.max_minutes} minutes", file=sys.stderr)
        if (cfg.max_minutes > 0 and not resume and step < cfg.max_steps
                and time.time() + eval_s + per_step > deadline):
            # the steps got slower than the early fit measured (s28: a 4.5-minute run still going at 5:10):
            # end here, so the last evaluation, checkpoint and final/ still come within max_minutes
            sync()
            if time.time() + eval_s + per_step > deadline:
                if not quiet:
                    print(f"\ntrain: steps slower than fitted; stopping at step {step} of {cfg.max_steps} to end "
                          f"within {cfg.max_minutes} minutes", file=sys.stderr)
                cfg.max_steps = step
                state["max_steps"] = step
                state["stopped_early"] = True
                if bar:
                    bar.total = step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            sync()
            step_loss = float(step_loss)
            now = time.time()
            tok_per_s = window_tokens / max(1e-9, now - window_t0)
            balance_hist = _mean_balance(aux_vals)
            dropped = sum(a.dropped for a in aux_vals)
            entry = {"step": step, "loss": round(step_loss, 4), "lr": lr, "tokens_per_s": round(tok_per_s),
                     "lb_loss": round(float(aux_vals[-1].lb_loss.detach()), 4),
                     "z_loss": round(float(aux_vals[-1].z_loss.detach()), 4),
                     **{k: round(v, 3) for k, v in balance_hist.items()}, "dropped": dropped}
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if bar:
                bar.update(step, {"loss": f"{step_loss:.3f}", "tok/s": f"{tok_per_s / 1e3:.0f}k",
                                  "load max/mean": f"{balance_hist['max_over_mean']:.2f}",
                                  "cv": f"{balance_hist['cv']:.2f}"})
            state["train_seconds"] += now - window_t0
            window_tokens, window_t0 = 0, now
        last = step == cfg.max_steps
        if heldout is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            t = time.time()
            ev = evaluate(model, heldout, cfg, dev)
            state["evals"].append({"step": step, "eval_loss": round(ev, 4)})
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "eval_loss": round(ev, 4)}) + "\n")
            if not quiet:
                (bar.stream if bar else sys.stderr).write(f"{'' if not bar or not bar.tty else chr(10)}"
                                                          f"step {step}: held-out loss {ev:.4f}\n")
            eval_s = max(eval_s, time.time() - t)  # the last one must fit before the deadline too
            window_t0 += time.time() - t  # evaluation time is not training time
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            t = time.time()
            state["max_steps"] = cfg.max_steps
            save_checkpoint(out, step, model, opt, gens, state, paths.tokenizer, cfg, dev)
            window_t0 += time.time() - t
    if bar:
        bar.close()
    collector.remove()
    restore_experts(patched)
    final_bytes = export_model(model, out / "final", cfg.save_dtype, paths.tokenizer)
    train_s = state["train_seconds"]
    metrics = {
        "steps": step, "tokens": state["tokens"], "tokens_per_step": cfg.tokens_per_step,
        "train_seconds": round(train_s, 1), "tokens_per_s": round(state["tokens"] / max(1e-9, train_s)),
        "last_window_tokens_per_s": round(tok_per_s), "tokenize_seconds": round(tokenize_s, 1),
        "train_loss": round(float(sum(loss_hist)) / len(loss_hist), 4) if loss_hist else None,
        "eval_loss": state["evals"][-1]["eval_loss"] if state["evals"] else None, "evals": state["evals"],
        "params": counts, "final_bytes": final_bytes, "save_dtype": cfg.save_dtype,
        "balance": balance_hist, "device": str(dev), "config": dataclasses.asdict(cfg),
        "stopped_early": bool(state.get("stopped_early")),
    }
    if hasattr(model, "config"):
        metrics["model"] = model.config.to_hf_dict() if hasattr(model.config, "to_hf_dict") else None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _mean_balance(auxes) -> dict[str, float]:
    load = sum(a.load_LE for a in auxes).cpu()
    rows = [balance_stats(r) for r in load]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


# --- command line ---------------------------------------------------------------------------------
_FLAG_FIELDS = ("max_steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup_steps", "seed", "eval_every",
                "eval_tokens", "save_every", "log_every", "precision", "save_dtype", "backend", "max_minutes",
                "lb_coef", "z_coef", "bias_rate", "jitter_eps", "capacity_factor", "weight_decay", "min_lr_ratio")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="recipe JSON (from scratch), e.g. moe/recipes/default.json")
    src.add_argument("--init", help="model directory to continue training (or to evaluate)")
    p.add_argument("--data", required=True, help="corpus directory from `moe corpus`, or a text file/directory")
    p.add_argument("--eval-data", help="held-out text (default: heldout.txt of a corpus directory)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --init's, or the corpus's)")
    p.add_argument("--out", help="output directory (checkpoints, final/, metrics.json)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--eval-only", action="store_true", help="print the held-out loss of --init and exit")
    p.add_argument("--quiet", action="store_true")
    defaults = TrainConfig()
    for name in _FLAG_FIELDS:
        typ = type(getattr(defaults, name))
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=f"(recipe 'train' value, else {getattr(defaults, name)!r})")


def run_train_command(args: argparse.Namespace) -> int:
    model_dict, train_dict = (load_recipe(args.config) if args.config else (None, {}))
    for name in _FLAG_FIELDS:
        v = getattr(args, name)
        if v is not None:
            train_dict[name] = v
    cfg = TrainConfig.from_dict(train_dict)
    if args.eval_only:
        if not args.init:
            raise ValueError("--eval-only needs --init MODEL_DIR")
        from .checkpoint import load_model
        dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                           ("cpu" if args.device == "auto" else args.device))
        paths = resolve_corpus(args.data, args.eval_data, args.tokenizer, args.init)
        text = paths.heldout or paths.train
        model = load_model(args.init, dtype=torch.float32, device=str(dev), backend=cfg.backend)
        loss = evaluate(model, TokenStream(load_token_ids(paths.tokenizer, text), dev), cfg, dev)
        print(json.dumps({"model": args.init, "data": str(text), "eval_loss": round(loss, 4),
                          "perplexity": round(math.exp(loss), 3)}))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required for training")
    m = train(cfg, args.out, args.data, model_dict=model_dict, init=args.init, eval_data=args.eval_data,
              tokenizer=args.tokenizer, device=args.device, resume=args.resume, quiet=args.quiet)
    print(json.dumps({k: m[k] for k in ("steps", "tokens", "tokens_per_s", "train_loss", "eval_loss",
                                        "final_bytes")} | {"balance": m["balance"], "out": str(args.out)}))
    return 0


def register(subparsers) -> None:
    """Add `moe train` and `moe corpus` to the hub's subparsers (moe/cli.py)."""
    p = subparsers.add_parser("train", help="train an MoE model on a text corpus",
                              description=__doc__.split("\n\n")[0])
    add_train_arguments(p)
    p.set_defaults(func=run_train_command)
    c = subparsers.add_parser("corpus", help="build the stdlib text corpus and its BPE tokenizer")
    add_corpus_arguments(c)
    c.set_defaults(func=run_corpus_command)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe.train")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(["train", *argv] if argv and argv[0] not in ("train", "corpus") else argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
