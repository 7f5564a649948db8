"""The ``moe`` command line: the hub of all sub-commands, and ``moe generate``.

``moe generate [MODEL] --prompt TEXT`` loads a model directory (a progress bar on stderr while
the weights load) and streams the continuation to stdout as it is generated. Without MODEL it
uses the embedded default model (``moe/assets/default/``); while that has not been built yet it
falls back to a tiny untrained model made on the fly (``moe.tiny``) and says so.

Other packages add their sub-commands through ``register(subparsers)`` in the modules of
``LAZY_COMMANDS``; each sets ``func`` on its parser (``p.set_defaults(func=handler)``), and the
hub calls ``handler(args)``, whose return value is the exit code (None means 0). A module is
imported only when its command is run (``moe serve`` imports Ray; ``moe generate`` must not), so
``moe --help`` lists those commands with the help text written here. A command whose module is
missing or broken reports that it is not available, and the other commands still work.

User mistakes (a missing model directory, a bad flag value) end with a one-line
``moe: error: ...`` on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

# command -> (module providing register(subparsers), help shown by `moe --help`)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("moe.train", "train an MoE model on a text corpus"),
    "corpus": ("moe.train", "build the stdlib text corpus and its BPE tokenizer"),
    "predictor": ("routing.cli", "train / evaluate the routing-path predictor"),
    "place": ("placement.cli", "place experts on ranks from a routing trace (ExFlow ILP)"),
    "serve": ("serve.cli", "serve a model with an OpenAI-compatible API on Ray Serve"),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("torch", "triton")


class CLIError(Exception):
    """A user mistake caught by the command line itself; printed as one line, exit code 2."""


# --- progress bar ------------------------------------------------------------------------------
class ProgressBar:
    """``progress(done_bytes, total_bytes)`` callback: on a terminal, one line redrawn in place
    (when the bar or the percentage changes); elsewhere (a log file, a pipe) one line at the end."""

    def __init__(self, label: str = "loading weights", stream: TextIO | None = None, width: int = 30):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self._last: tuple[int, int] | None = None
        self._start = time.perf_counter()
        self._done = False

    def __call__(self, done: int, total: int) -> None:
        if total <= 0 or self._done:
            return
        done = min(max(done, 0), total)
        key = (done * 100 // total, done * self.width // total)  # integers: no float rounding jitter
        finished = done >= total
        if key == self._last and not finished:
            return
        self._last = key
        size = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB"
        if finished:
            self._done = True
            secs = time.perf_counter() - self._start
            bar = "#" * self.width
            self.stream.write(f"{chr(13) if self.live else ''}{self.label} [{bar}] 100% {size} in {secs:.1f} s\n")
        elif self.live:
            bar = "#" * key[1] + "-" * (self.width - key[1])
            self.stream.write(f"\r{self.label} [{bar}] {key[0]:3d}% {size}")
        self.stream.flush()


# --- model loading shared by commands that run a model --------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL and the flags that say how to load it (shared by every command that runs a model)."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model directory (config.json, *.safetensors, tokenizer.json); 'tiny' for the on-the-fly "
                        "test model; default: the embedded default model")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and activations dtype (default auto: the checkpoint's own)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default auto: cuda when a GPU is present, else cpu)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                   help="expert computation: torch (reference) or triton (fused grouped-GEMM kernels; decode steps "
                        "replay from CUDA graphs); auto (default): triton on a GPU, torch on the CPU")
    from offload.cli_args import add_offload_args

    add_offload_args(p)


def apply_model_options(model, offload_cfg=None):
    """Optional transforms of a loaded model chosen by flags; returns the model to run.

    The place for steps such as expert offloading (``--gpu-memory``): ``offload_cfg`` is what
    ``offload.cli_args.offload_config_from_args`` made of the flags before the weights loaded (None: no
    offloading, also for commands that do not define the flags).
    """
    if offload_cfg is None:
        return model
    from offload import apply_offload

    return apply_offload(model, offload_cfg)


def resolve_model_dir(model: str | None, stderr: TextIO) -> Path:
    """The directory to load: the argument, the embedded default, or the tiny on-the-fly model."""
    from . import tiny

    if model is not None and not (model == "tiny" and not Path(model).exists()):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise CLIError(f"model directory {model} does not exist; pass a directory holding config.json, "
                           "model.safetensors and tokenizer.json (or omit MODEL for the default model)")
        return path
    if model is None and tiny.default_model_is_embedded():
        return tiny.ASSETS_DEFAULT
    path = tiny.ensure_tiny_model()
    reason = "as asked" if model == "tiny" else \
        f"because no trained default model is embedded yet ({tiny.ASSETS_DEFAULT} has no config.json)"
    stderr.write(f"moe: note: using a tiny UNTRAINED model built on the fly at {path} {reason}; "
                 "its output is random text. Pass a model directory to run a real model.\n")
    return path


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                       f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def load_from_args(args: argparse.Namespace, stderr: TextIO | None = None, kv_tokens=None):
    """(model, tokenizer) as the flags of ``add_model_arguments`` say, with a progress bar. ``kv_tokens(tok)``: the
    tokens one sequence's KV cache will hold, counted in an offload budget before the experts (None: none)."""
    import torch

    from .checkpoint import load_model
    from .tokenizer import Tokenizer

    stderr = stderr if stderr is not None else sys.stderr
    path = resolve_model_dir(args.model, stderr)
    device = _resolve_device(args.device)
    from kernels import resolve_backend
    backend = resolve_backend(args.backend, device)  # (refuses triton off a CUDA device, with the fix)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    tok = Tokenizer.from_dir(path)  # first: a missing tokenizer fails before the weights load
    from offload.cli_args import offload_config_from_args
    # so do wrong offload flags and missing or broken probe files (the config is applied once the weights load)
    offload_cfg = offload_config_from_args(args, checkpoint=str(path))
    offloading = offload_cfg is not None
    if offloading:  # and a budget that cannot hold one layer's active experts: from the shapes, not the weights
        import dataclasses

        from offload.apply import check_budget, kv_cache_bytes

        from .checkpoint import model_skeleton
        skeleton = model_skeleton(path, dtype, backend)
        if kv_tokens is not None:  # the sequence's KV cache comes out of the budget first
            kv = kv_cache_bytes(skeleton.config, 1, kv_tokens(tok), skeleton.dtype)
            offload_cfg = dataclasses.replace(offload_cfg, kv_cache_bytes=kv)
        check_budget(skeleton, offload_cfg)
    # with --gpu-memory the weights load into host memory; apply_offload then moves the dense part
    # to the device and keeps the experts in the (pinned) host store
    model = load_model(path, dtype=dtype, device="cpu" if offloading else device, backend=backend,
                       progress=ProgressBar(stream=stderr))
    model.eval()
    return apply_model_options(model, offload_cfg), tok


# --- moe generate ---------------------------------------------------------------------------------
def register_generate(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate text from a prompt, streamed as it is produced",
        description="Load MODEL and stream the continuation of --prompt to stdout (greedy unless "
                    "--temperature > 0). Loading progress and a summary go to stderr.")
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 to sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 0 < p <= 1 (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (trimmed from the output); repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run every decode step eagerly (by default a resident model on a GPU with the triton backend "
                        "replays decode steps from CUDA graphs)")
    p.add_argument("--prefill-chunk", default="auto", type=prefill_chunk_arg, metavar="N|auto|off",
                   help="feed the prompt N tokens a step (chunked prefill: a step's activations grow with its "
                        "tokens); auto (the default): the largest power of two whose activations fit --offload-reserve "
                        "with --gpu-memory, or the GPU's free memory (offload.auto_prefill_chunk), the whole prompt "
                        "where it fits and on the CPU; off: the whole prompt in one step")
    p.set_defaults(func=run_generate)
    return p


def prefill_chunk_arg(text: str) -> int | str | None:
    """--prefill-chunk: 'auto', 'off' (None: the whole prompt) or a token count >= 1 (generate.prefill_chunk_setting)."""
    from .generate import prefill_chunk_setting
    try:
        return prefill_chunk_setting(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prefill-chunk {text!r}: give a token count >= 1, 'auto' or 'off'") from None


def run_generate(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    from .generate import stream_outputs
    from .sampling import SamplingParams

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.system is not None and not args.chat:
        raise CLIError("--system only applies with --chat; add --chat or drop --system")
    # checked before loading weights, so a bad flag fails at once
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)

    def encode(tok) -> list[int]:
        text = prompt
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
            text = tok.apply_chat_template(messages + [{"role": "user", "content": prompt}])
        return tok.encode(text)
    # (the engine's KV cache holds the prompt and max_new_tokens: an offload budget counts it)
    model, tok = load_from_args(args, stderr, kv_tokens=lambda tok: max(2, len(encode(tok)) + args.max_new_tokens))
    prompt_ids = encode(tok)
    trained = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if trained and len(prompt_ids) + args.max_new_tokens > trained:
        # rotary positions past the trained context compute, but the text degrades: said, as llama.cpp does
        stderr.write(f"moe: warning: the prompt's {len(prompt_ids)} tokens + --max-new-tokens {args.max_new_tokens} "
                     f"exceed the model's context of {trained} tokens (max_position_embeddings); text past it is "
                     "unreliable: shorten the prompt or lower --max-new-tokens\n")
    chunk = args.prefill_chunk
    if chunk == "auto":  # (offload.auto_prefill_chunk: inside the reserve offloaded, the free memory resident)
        from offload import auto_prefill_chunk
        offloaded = getattr(model, "offload_cache", None) is not None
        chunk = auto_prefill_chunk(model, 1, len(prompt_ids) + args.max_new_tokens)
        if chunk is not None and chunk < len(prompt_ids):
            stderr.write(f"moe: the prompt's {len(prompt_ids)} tokens are fed {chunk} a step, so the prefill's "
                         + ("activations fit --offload-reserve; each chunk fetches its missed experts again, so a "
                            "larger --offload-reserve (or --prefill-chunk) prefills faster\n" if offloaded else
                            "activations fit the GPU's free memory (--prefill-chunk to choose)\n"))
    start = time.perf_counter()
    n_tokens, reason, first = 0, None, None
    for out in stream_outputs(model, tok, prompt_ids, params, cuda_graph=False if args.no_cuda_graph else None,
                              prefill_chunk=chunk):
        if first is None:  # the prompt's last chunk and the first token's sampling are done
            first = time.perf_counter() - start
        if out.new_text:
            stdout.write(out.new_text)
            stdout.flush()
        n_tokens += len(out.new_token_ids)
        reason = out.finish_reason
    stdout.write("\n")
    stdout.flush()
    secs = time.perf_counter() - start
    first = secs if first is None else first
    n_prompt = len(prompt_ids)
    chunks = -(-n_prompt // chunk) if isinstance(chunk, int) and chunk < n_prompt else 1
    # prefill and decode apart, as llama.cpp reports its prompt and eval times: a long prompt's prefill is not decode
    prefill = f"{n_prompt} prompt tokens in {first:.2f} s ({n_prompt / max(first, 1e-9):.1f} tokens/s" + (
        f", {chunks} chunks of {chunk})" if chunks > 1 else ")")
    rest = f", then {(n_tokens - 1) / max(secs - first, 1e-9):.1f} tokens/s" if n_tokens > 1 else ""
    stderr.write(f"moe: {prefill}; {n_tokens} generated in {secs:.2f} s (the first at {first:.2f} s{rest}), "
                 f"finished: {reason}\n")
    cache = getattr(model, "offload_cache", None)
    if cache is not None:  # --gpu-memory: where the experts were and what moving them took
        stderr.write(f"moe: {cache.describe()}\n")
        if getattr(cache, "driver_choice", None):  # which cache decides, and why (offload.apply.driver_choice)
            stderr.write(f"moe: offload {cache.driver_choice}\n")
    return 0


# --- the hub ----------------------------------------------------------------------------------------
def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        sys.stderr.write(f"moe: `moe {name}` is not available yet: {reason}\n")
        return 1
    handler.unavailable = True  # main() lets such a command swallow any arguments
    return handler


def _register_lazy(subparsers, command: str | None) -> None:
    """Import the module of ``command`` (only that one) and let it register its parsers; every
    other lazy command gets a light parser that only carries its help line."""
    if command in LAZY_COMMANDS:
        module_name = LAZY_COMMANDS[command][0]
        reason = None
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            itself = missing and (module_name == missing or module_name.startswith(missing + "."))
            reason = (f"{module_name} is not part of this installation" if itself
                      else f"importing {module_name} failed: {e}")
        except Exception as e:  # a broken module must not take `moe --help` or `moe generate` down
            reason = f"importing {module_name} failed: {type(e).__name__}: {e}"
        else:
            register = getattr(module, "register", None)
            if register is None:
                reason = f"{module_name} has no register(subparsers) function"
            else:
                register(subparsers)
        if reason is not None:
            p = subparsers.add_parser(command, help=LAZY_COMMANDS[command][1], add_help=False)
            p.set_defaults(func=_unavailable(command, reason))
    for name, (module_name, help_text) in LAZY_COMMANDS.items():
        if name not in subparsers.choices:
            p = subparsers.add_parser(name, help=help_text, add_help=False)
            p.set_defaults(func=_unavailable(name, f"{module_name} was not loaded"))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("moeflow")
    except Exception:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="moeflow: run, train and serve Mixture-of-Experts language models.",
        epilog="Run `moe COMMAND --help` for the options of one command.")
    parser.add_argument("--version", action="version", version=f"moeflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_generate(sub)
    _register_lazy(sub, command)
    return parser


def _command_of(argv: list[str]) -> str | None:
    # the hub has no options that take a value, so the first word not starting with '-' is the command
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(getattr(args, "func", None), "unavailable", False):
            args = parser.parse_args(argv)  # reports the unknown arguments the usual way
    except SystemExit as e:  # --help, --version, or a usage error argparse has already printed
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # user mistakes (ValueError covers CheckpointError, TokenizerError and SamplingParams) get one
        # line, no traceback; anything else is a bug and keeps its traceback
        sys.stdout.flush()
        sys.stderr.write(f"moe {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\nmoe: interrupted\n")
        return 130
    return 0 if code is None else int(code)


if __name__ == "__main__":
    raise SystemExit(main())
