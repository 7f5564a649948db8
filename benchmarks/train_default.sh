#!/usr/bin/env bash
# Trains the embedded default model, its dense baseline (same active parameters) and a
# 16-layer x 64-expert top-8 model for routing traces, on the Python stdlib corpus; evaluates
# each on held-out text; records routing traces on held-out text; prints a summary table last.
#
# GPU (one H200, ~10 minutes):      bash benchmarks/train_default.sh
# CPU smoke test (tiny settings):  SMOKE=1 bash benchmarks/train_default.sh
#
# Environment:
#   WORK     where runs and checkpoints go (default runs/train_default; large, not returned)
#   RESULTS  small results: default_model.tar (the shippable checkpoint), traces_*.npz,
#            metrics.json, summary.txt, log.txt (default: $OUT if set, else benchmarks/results)
#   TRACES   where the traces go (default benchmarks/traces: default.npz, large.npz)
#   DEVICE   cuda | cpu (default: cuda if available)
#   SMOKE=1  a few steps of tiny batches on a small corpus (checks the whole pipeline on a CPU)
#   EXTRA    more `moe train` flags for every run, e.g. "--backend triton"
#   FROM     start at a later stage of an earlier run in the same WORK:
#            corpus | default | dense | large | eval | traces | summary
#   UNTIL    stop after this stage (default summary); FROM/UNTIL split the job into several calls
# Installing the default model afterwards:
#   mkdir -p moe/assets/default && tar -xf $RESULTS/default_model.tar -C moe/assets/default
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-runs/train_default}
RESULTS=${RESULTS:-${OUT:-benchmarks/results}}
TRACES=${TRACES:-benchmarks/traces}
DEVICE=${DEVICE:-$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
EXTRA=${EXTRA:-}
CORPUS_ARGS=""
TRACE_TOKENS_DEFAULT=65536
TRACE_TOKENS_LARGE=32768
if [ "${SMOKE:-0}" = "1" ]; then
  CORPUS_ARGS="--max-bytes 400000 --vocab-size 512"
  EXTRA="--max-steps 3 --batch-size 2 --seq-len 64 --eval-every 0 --eval-tokens 512 --log-every 1 --max-minutes 0 $EXTRA"
  TRACE_TOKENS_DEFAULT=1024
  TRACE_TOKENS_LARGE=512
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a crowded small CPU: one thread per process is fastest
fi
FROM=${FROM:-corpus}
STAGES=(corpus default dense large eval traces summary)
start=-1
for i in "${!STAGES[@]}"; do [ "${STAGES[$i]}" = "$FROM" ] && start=$i; done
[ "$start" -ge 0 ] || { echo "FROM=$FROM is not a stage; choose one of ${STAGES[*]}" >&2; exit 2; }
UNTIL=${UNTIL:-summary}
stop=-1
for i in "${!STAGES[@]}"; do [ "${STAGES[$i]}" = "$UNTIL" ] && stop=$i; done
[ "$stop" -ge "$start" ] || { echo "UNTIL=$UNTIL must be a stage at or after FROM=$FROM (${STAGES[*]})" >&2; exit 2; }
run_stage() {  # run_stage NAME: true when stage NAME lies in FROM..UNTIL
  local i
  for i in "${!STAGES[@]}"; do
    [ "${STAGES[$i]}" = "$1" ] && [ "$i" -ge "$start" ] && [ "$i" -le "$stop" ] && return 0
  done
  return 1
}
[ "$FROM" = "corpus" ] && rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS" "$TRACES"
LOG="$RESULTS/log.txt"
[ "$FROM" = "corpus" ] && : > "$LOG"
T0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }

if run_stage corpus; then
stamp "corpus + tokenizer"
$PY -m moe.corpus "$WORK/corpus" $CORPUS_ARGS 2>&1 | tee -a "$LOG"

fi

if run_stage default; then
stamp "default model (Mixtral format, 8 experts top-2)"
rm -rf "$WORK/default"
$PY -m moe.train --config moe/recipes/default.json --data "$WORK/corpus" --out "$WORK/default" \
    --device "$DEVICE" $EXTRA 2>&1 | tee -a "$LOG"
fi

if run_stage dense; then
STEPS=$($PY -c "import json; print(json.load(open('$WORK/default/metrics.json'))['steps'])")
stamp "dense baseline (same active parameters, same $STEPS steps)"
rm -rf "$WORK/dense"
$PY -m moe.train --config moe/recipes/dense_baseline.json --data "$WORK/corpus" --out "$WORK/dense" \
    --device "$DEVICE" --max-steps "$STEPS" $EXTRA 2>&1 | tee -a "$LOG"

fi

if run_stage large; then
stamp "large model for traces (16 layers x 64 experts, top-8)"
rm -rf "$WORK/large"
# on a GPU the fused Triton kernels train it (~80k tokens/s on an H200, where the torch backend's loop over
# 64 experts x 16 layers made 5k: 59 steps in 1.5 minutes and a collapsed router, BENCHMARKS 7c)
LARGE_BACKEND=""
case "$DEVICE" in cuda*) LARGE_BACKEND="--backend triton" ;; esac
$PY -m moe.train --config moe/recipes/large_traces.json --data "$WORK/corpus" --out "$WORK/large" \
    --device "$DEVICE" $LARGE_BACKEND $EXTRA 2>&1 | tee -a "$LOG"

fi

if run_stage eval; then
stamp "held-out loss of each shipped (bf16) checkpoint"
for m in default dense large; do
  $PY -m moe.train --eval-only --init "$WORK/$m/final" --data "$WORK/corpus" --device "$DEVICE" \
      --seq-len 512 --batch-size 32 --eval-tokens 0 $EXTRA \
      | tee "$WORK/$m/eval.json" | tee -a "$LOG"
done
fi

if run_stage traces; then
stamp "routing traces on held-out text"
$PY - "$WORK" "$RESULTS" "$DEVICE" "$TRACE_TOKENS_DEFAULT" "$TRACE_TOKENS_LARGE" "$TRACES" <<'EOF' 2>&1 | tee -a "$LOG"
import json, shutil, sys
from pathlib import Path

import numpy as np
import torch

from moe.checkpoint import load_model
from moe.corpus import EOS_TEXT, read_documents
from routing import RoutingTrace

work, results, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
budget = {"default": int(sys.argv[4]), "large": int(sys.argv[5])}
traces_dir = Path(sys.argv[6])


def heldout_sequences(tok_dir, max_tokens, seq_len=512):
    """Held-out text as requests of up to seq_len tokens (each document cut into consecutive
    pieces; a document's first piece starts with EOS, as every document does in training)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TEXT)
    seqs, total = [], 0
    for enc in tok.encode_batch(read_documents(work / "corpus" / "heldout.txt"), add_special_tokens=False):
        ids = [eos] + enc.ids
        for i in range(0, len(ids), seq_len):
            piece = ids[i:i + seq_len][:max_tokens - total]
            if len(piece) < 16:
                continue
            seqs.append(piece)
            total += len(piece)
            if total >= max_tokens:
                return seqs
    return seqs


def record_with_hooks(model, seqs, batch_size=16):
    """Fallback recorder: forward hooks on every block.router (one request per sequence)."""
    blocks = model.moe_blocks()
    ids_per_layer = [[] for _ in blocks]
    w_per_layer = [[] for _ in blocks]
    handles = []
    for i, b in enumerate(blocks):
        def hook(mod, args, out, i=i):
            ids_per_layer[i].append(out[0].cpu())
            w_per_layer[i].append(out[1].float().cpu())
        handles.append(b.router.register_forward_hook(hook))
    req, pos = [], []
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            S = max(map(len, chunk))
            x = torch.zeros(len(chunk), S, dtype=torch.long)
            valid = torch.zeros(len(chunk), S, dtype=torch.bool)
            for b, q in enumerate(chunk):
                x[b, :len(q)] = torch.tensor(q)
                valid[b, :len(q)] = True
            n0 = [len(a) for a in ids_per_layer]
            model(x.to(device), valid_BT=valid.to(device))
            keep = valid.reshape(-1)
            for i in range(len(blocks)):
                ids_per_layer[i][-1] = ids_per_layer[i][-1][keep]
                w_per_layer[i][-1] = w_per_layer[i][-1][keep]
            for b, q in enumerate(chunk):
                req += [s + b] * len(q)
                pos += list(range(len(q)))
    for h in handles:
        h.remove()
    ids = np.stack([torch.cat(a).numpy() for a in ids_per_layer])
    w = np.stack([torch.cat(a).numpy() for a in w_per_layer])
    return RoutingTrace(ids, model.config.num_experts, w, np.array(req), np.array(pos))


for name in ("default", "large"):
    final = work / name / "final"
    model = load_model(final, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32, device=device)
    model.eval()
    seqs = heldout_sequences(final, budget[name])
    try:
        from routing.record import record_sequences
        with torch.no_grad():
            trace, _ = record_sequences(model, seqs, batch_size=16, device=device)
        how = "routing.record"
    except ImportError:
        trace = record_with_hooks(model, seqs)
        how = "router hooks"
    meta = {"model": f"moeflow-{name}", "recipe": f"moe/recipes/{'default' if name == 'default' else 'large_traces'}.json",
            "text": "python stdlib held-out split", "recorder": how}
    trace = RoutingTrace(trace.expert_ids, trace.num_experts, trace.weights if name == "default" else None,
                         trace.request_ids, trace.positions, {**trace.meta, **meta},
                         token_ids=getattr(trace, "token_ids", None))  # a predictor feature
    path = trace.save(traces_dir / f"{name}.npz")
    shutil.copy2(path, results / f"traces_{name}.npz")
    print(f"trace {name}: {trace} -> {path} ({path.stat().st_size / 1e6:.1f} MB, {how})")
EOF
fi

if run_stage summary; then
stamp "summary"
tar -cf "$RESULTS/default_model.tar" -C "$WORK/default/final" .
$PY - "$WORK" "$RESULTS" <<'EOF' 2>&1 | tee -a "$LOG" | tee "$RESULTS/summary.txt"
import json, math, sys
from pathlib import Path

import numpy as np

from routing import RoutingTrace

work, results = Path(sys.argv[1]), Path(sys.argv[2])
rows, allm = [], {}
for name in ("default", "dense", "large"):
    m = json.loads((work / name / "metrics.json").read_text())
    ev = json.loads((work / name / "eval.json").read_text().strip().splitlines()[-1])
    m["eval_bf16"] = ev
    allm[name] = m
    p = m["params"]
    rows.append([name, f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)", m["steps"], f"{m['tokens'] / 1e6:.1f}M",
                 f"{m['tokens_per_s'] / 1e3:.0f}k", m["train_loss"], m["eval_loss"], ev["eval_loss"],
                 f"{math.exp(ev['eval_loss']):.2f}", f"{m['balance'].get('max_over_mean', 0):.2f}",
                 f"{m['balance'].get('cv', 0):.2f}", f"{m['final_bytes'] / 1e6:.1f}"])


def affinity(trace):
    """How concentrated P(expert at layer l+1 | expert at layer l) is, over all consecutive layers.

    top1: mean over (l, e) (weighted by e's use) of max_e' P(e' | e), against 1/E if routing
    were independent across layers; entropy: mean normalised entropy of P(. | e) (1 = uniform).
    """
    ids, E = trace.expert_ids.astype(np.int64), trace.num_experts
    top1, ent, wsum = 0.0, 0.0, 0.0
    for l in range(ids.shape[0] - 1):
        a, b = ids[l], ids[l + 1]  # [T, K]
        pair = (a[:, :, None] * E + b[:, None, :]).reshape(-1)  # every (expert at l, expert at l+1) of a token
        ok = ((a[:, :, None] >= 0) & (b[:, None, :] >= 0)).reshape(-1)
        C = np.bincount(pair[ok], minlength=E * E).reshape(E, E).astype(float)
        n = C.sum(1)
        used = n > 0
        P = C[used] / n[used, None]
        w = n[used] / n.sum()
        top1 += (P.max(1) * w).sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(P > 0, P * np.log(P), 0.0)).sum(1) / math.log(E)
        ent += (h * w).sum()
        wsum += 1
    return top1 / wsum, ent / wsum


def load_balance(trace):
    E = trace.num_experts
    mm, cv = [], []
    for l in range(trace.num_layers):
        ids = trace.expert_ids[l].reshape(-1)
        load = np.bincount(ids[ids >= 0], minlength=E).astype(float)
        mm.append(load.max() / load.mean())
        cv.append(load.std() / load.mean())
    return float(np.mean(mm)), float(np.mean(cv))


hdr = ["model", "params (active)", "steps", "tokens", "tok/s", "train loss", "held-out loss", "held-out bf16",
       "ppl", "load max/mean", "load CV", "ckpt MB"]
widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
print("\n## Training (one run each; held-out = stdlib files never trained on)")
print(" | ".join(h.ljust(w) for h, w in zip(hdr, widths)))
print(" | ".join("-" * w for w in widths))
for r in rows:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
print("\n## Routing traces on held-out text")
print("trace | layers | tokens | top-k | experts | load max/mean | load CV | affinity top1 P(next|e) | uniform 1/E | norm. entropy")
traces = {}
for name in ("default", "large"):
    t = RoutingTrace.load(results / f"traces_{name}.npz")
    top1, ent = affinity(t)
    mm, cv = load_balance(t)
    traces[name] = {"layers": t.num_layers, "tokens": t.num_tokens, "top_k": t.top_k, "experts": t.num_experts,
                    "load_max_over_mean": mm, "load_cv": cv, "affinity_top1": top1, "uniform": 1 / t.num_experts,
                    "norm_entropy": ent}
    print(f"{name} | {t.num_layers} | {t.num_tokens} | {t.top_k} | {t.num_experts} | {mm:.2f} | {cv:.2f} | "
          f"{top1:.3f} | {1 / t.num_experts:.3f} | {ent:.3f}")
d, b = allm["default"]["eval_bf16"]["eval_loss"], allm["dense"]["eval_bf16"]["eval_loss"]
print(f"\nMoE vs dense (same active parameters, same steps): held-out loss {d:.4f} vs {b:.4f} "
      f"({'MoE better' if d < b else 'dense better'} by {abs(b - d):.4f} nats/token)")
(results / "metrics.json").write_text(json.dumps({"runs": allm, "traces": traces}, indent=1))
EOF
fi
stamp "done"
