"""The corpus recipe: real text present on every machine, and a byte-level BPE tokenizer for it.

The default model is trained on the Python standard library's own source code and docstrings:
every machine that runs moeflow has it, nothing is downloaded, and anyone can rebuild the corpus
with one command (``moe corpus OUT``, or ``python -m moe.corpus OUT``).

    OUT/train.txt          training text: one document per stdlib file, separated by EOS_TEXT
    OUT/heldout.txt        held-out text, the same format
    OUT/manifest.json      which files went where, their sizes and the Python version
    OUT/tokenizer/         tokenizer.json + tokenizer_config.json (eos/bos, a chat template)

The split is by file and fixed: a file is held out when a hash of its path relative to the stdlib
root falls in the held-out fraction, so the same file lands on the same side on every machine
and every Python version (the stdlib itself differs a little between versions; the manifest
records which one was used).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

EOS_TEXT = "<|endoftext|>"
# A plain chat template: the model is a base model of Python text, so a conversation is rendered
# as role-prefixed lines and the model continues after "assistant:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Directory names never taken into the corpus: test suites (large, repetitive and not
# documentation), third-party packages, and machine-generated tables.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "lib-dynload", "encodings", "ensurepip"})
_SKIP_FILE_PREFIXES = ("_sysconfigdata",)  # build-machine specific


@dataclass(frozen=True)
class CorpusConfig:
    """Settings of the corpus recipe."""
    root: str = ""  # stdlib root; "" = this interpreter's sysconfig.get_paths()['stdlib']
    heldout_fraction: float = 0.04
    max_file_bytes: int = 1_000_000  # skip larger files (generated tables); pydoc_data/topics.py, the docs, fits
    max_total_bytes: int = 0  # 0 = no limit; tests use a small corpus
    # several kinds of text (``parse_mix``): ((name, (name endings, ...)), ...); () = Python files alone. With a mix,
    # files are taken in the order of a hash of their path (kinds and packages interleaved, not the walk's order)
    # and each kind gets an equal share of max_total_bytes
    mix: tuple = ()

    def __post_init__(self):
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes}")
        if self.max_total_bytes < 0:
            raise ValueError(f"max_total_bytes must be >= 0 (0 = no limit), got {self.max_total_bytes}")
        for kind in self.mix:
            if len(kind) != 2 or not kind[0] or not kind[1] or not all(kind[1]):
                raise ValueError(f"a mix kind is (name, (name endings, ...)), got {kind!r}; see parse_mix")

    def kind_of(self, name: str) -> str | None:
        """The mix kind a file name belongs to (the first whose ending matches), or None; without a mix, "python"
        for a .py file."""
        if not self.mix:
            return "python" if name.endswith(".py") else None
        for kind, endings in self.mix:
            if name.endswith(tuple(endings)):
                return kind
        return None

    def stdlib_root(self) -> Path:
        root = Path(self.root or sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise ValueError(f"stdlib root {root} is not a directory; pass --root pointing at a Python lib dir")
        return root


def parse_mix(text: str) -> tuple:
    """``"code=.py;c=.h,.hpp;prose=.md,.txt,METADATA"`` -> (("code", (".py",)), ("c", (".h", ".hpp")), ...): kinds
    of text by file-name ending, for CorpusConfig.mix."""
    kinds = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, endings = part.partition("=")
        ends = tuple(e.strip() for e in endings.split(",") if e.strip())
        if not eq or not name.strip() or not ends:
            raise ValueError(f"--mix takes KIND=ENDING[,ENDING...][;KIND=...], e.g. 'code=.py;c=.h,.hpp'; got {part!r}")
        kinds.append((name.strip(), ends))
    names = [k for k, _ in kinds]
    if len(set(names)) != len(names):
        raise ValueError(f"--mix names a kind twice: {names}")
    return tuple(kinds)


def iter_stdlib_files(cfg: CorpusConfig) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every corpus file under the stdlib root, in sorted order (with a mix, every file
    of one of its kinds, in the order of a hash of the relative path)."""
    root = cfg.stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # sorting in place makes os.walk's order deterministic across file systems
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if cfg.kind_of(name) is None or name.startswith(_SKIP_FILE_PREFIXES):
                continue
            if name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            if cfg.mix:
                found.append((path.relative_to(root).as_posix(), path))
            else:
                yield path.relative_to(root).as_posix(), path
    yield from sorted(found, key=lambda f: hashlib.sha256(b"order:" + f[0].encode()).digest())


def is_heldout(rel_path: str, fraction: float) -> bool:
    """Fixed split by a hash of the relative path (same answer on every machine)."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


def build_corpus(out_dir: str | Path, cfg: CorpusConfig = CorpusConfig()) -> dict:
    """Write train.txt, heldout.txt and manifest.json under out_dir; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": [], "heldout": []}
    files = {"train": [], "heldout": []}
    kinds = [k for k, _ in cfg.mix] or ["python"]
    used = {(side, k): 0 for side in ("train", "heldout") for k in kinds}
    held_by_kind: dict[str, list[str]] = {k: [] for k in kinds}
    # with a byte limit each side gets its share, so a small corpus still has held-out text; with a mix each kind
    # gets an equal part of each side's share
    share = {"train": (1 - cfg.heldout_fraction) / len(kinds), "heldout": cfg.heldout_fraction / len(kinds)}
    limit = ({key: cfg.max_total_bytes * share[key[0]] for key in used} if cfg.max_total_bytes else None)
    for rel, path in iter_stdlib_files(cfg):
        side = "heldout" if is_heldout(rel, cfg.heldout_fraction) else "train"
        key = (side, cfg.kind_of(path.name))
        if limit is not None and used[key] >= limit[key]:
            if all(used[k] >= limit[k] for k in used):
                break
            continue
        raw = path.read_bytes()
        if len(raw) > cfg.max_file_bytes or not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib files carry other encodings; not worth guessing
        text = text.replace(EOS_TEXT, "")  # the separator must never occur inside a document
        doc = f"# file: {rel}\n{text.rstrip()}\n"
        parts[side].append(doc)
        files[side].append(rel)
        used[key] += len(raw)
        if side == "heldout":
            held_by_kind[key[1]].append(doc)
    if not files["train"] or not files["heldout"]:
        raise ValueError(f"corpus too small to split ({len(files['train'])} train / {len(files['heldout'])} "
                         f"held-out files); raise max_total_bytes or heldout_fraction")
    sizes = {}
    for side in ("train", "heldout"):
        data = EOS_TEXT.join(parts[side])
        (out / f"{side}.txt").write_text(data, encoding="utf-8")
        sizes[side] = len(data.encode())
    if cfg.mix:  # each kind's held-out text alone too: requests of one kind (routing traces by kind)
        for k, docs in held_by_kind.items():
            (out / f"heldout.{k}.txt").write_text(EOS_TEXT.join(docs), encoding="utf-8")
    # --root names another tree of Python files (BENCHMARKS 7f used a site-packages folder): say so
    source = "mixed-files" if cfg.mix else "python-files" if cfg.root else "python-stdlib"
    manifest = {"source": source, "python": sys.version.split()[0], "root": str(cfg.stdlib_root()),
                "heldout_fraction": cfg.heldout_fraction, "bytes": sizes,
                "num_files": {k: len(v) for k, v in files.items()}, "files": files}
    if cfg.mix:
        manifest["mix"] = {k: list(e) for k, e in cfg.mix}
        manifest["bytes_by_kind"] = {f"{side}.{k}": n for (side, k), n in used.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text corpus: a file, or every .txt/.py/.md file under a directory (sorted).

    Inside a file, EOS_TEXT separates documents (the recipe's format); any other file is one
    document.
    """
    p = Path(path)
    if p.is_file():
        paths = [p]
    elif p.is_dir():
        paths = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".py", ".md"))
    else:
        raise ValueError(f"corpus path {p} does not exist; build one with `moe corpus OUT`")
    if not paths:
        raise ValueError(f"no .txt/.py/.md files under {p}")
    docs = []
    for q in paths:
        docs.extend(d for d in q.read_text(encoding="utf-8", errors="replace").split(EOS_TEXT) if d.strip())
    return docs


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096,
                    model_max_length: int = 2048) -> Path:
    """Train a byte-level BPE tokenizer; write tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TEXT, "bos_token": EOS_TEXT,
              "pad_token": EOS_TEXT, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def load_token_ids(tokenizer_dir: str | Path, path: str | Path):
    """Token ids of a text corpus, documents joined by EOS (int32 tensor).

    Uses the tokenizer.json of tokenizer_dir directly (``tokenizers``), encoding documents in
    parallel.
    """
    import torch
    from tokenizers import Tokenizer

    tj = Path(tokenizer_dir) / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(f"{tj} not found: the model directory needs a tokenizer.json "
                         "(train one with `moe corpus`, or pass --tokenizer DIR)")
    tok = Tokenizer.from_file(str(tj))
    eos = tok.token_to_id(EOS_TEXT)
    if eos is None:
        raise ValueError(f"{tj} has no {EOS_TEXT} token; moeflow's corpus format separates documents with it")
    ids: list[int] = []
    for enc in tok.encode_batch(read_documents(path), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def run_corpus_command(args: argparse.Namespace) -> int:
    cfg = CorpusConfig(root=args.root, heldout_fraction=args.heldout_fraction,
                       max_total_bytes=args.max_bytes, mix=parse_mix(args.mix) if args.mix else ())
    out = Path(args.out)
    manifest = build_corpus(out, cfg)
    print(f"corpus: {manifest['num_files']['train']} train files ({manifest['bytes']['train'] / 1e6:.1f} MB), "
          f"{manifest['num_files']['heldout']} held-out files ({manifest['bytes']['heldout'] / 1e6:.2f} MB) "
          f"from Python {manifest['python']} -> {out}")
    if cfg.mix:
        print("by kind (source bytes): "
              + ", ".join(f"{k} {n / 1e6:.1f} MB" for k, n in manifest["bytes_by_kind"].items()))
    if args.vocab_size:
        tok_dir = train_tokenizer(read_documents(out / "train.txt"), out / "tokenizer", args.vocab_size)
        print(f"tokenizer: byte-level BPE, vocab {args.vocab_size} -> {tok_dir}")
    return 0


def add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output directory (train.txt, heldout.txt, manifest.json, tokenizer/)")
    p.add_argument("--root", default="", help="a tree of Python files (default: this Python's stdlib; "
                   "BENCHMARKS 7f used a site-packages folder for a larger corpus)")
    p.add_argument("--heldout-fraction", type=float, default=0.04)
    p.add_argument("--max-bytes", type=int, default=0, help="stop after this many source bytes (0 = all)")
    p.add_argument("--mix", default="", help="several kinds of text by file-name ending, each an equal share of "
                   "--max-bytes, e.g. 'code=.py;c=.h,.hpp,.cuh;prose=.md,.rst,.txt,METADATA' (default: .py files "
                   "alone); writes heldout.KIND.txt beside heldout.txt")
    p.add_argument("--vocab-size", type=int, default=4096, help="train a BPE tokenizer of this size (0 = none)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe.corpus", description=__doc__.splitlines()[0])
    add_corpus_arguments(p)
    return run_corpus_command(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
