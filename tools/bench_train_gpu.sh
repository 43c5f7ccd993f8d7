#!/usr/bin/env bash
# Training speed on one GPU, side by side with the torch.compile reference, in one job (issue 9).
#
#   tools/bench_train_gpu.sh [main|sweep_gpt2|sweep_llama|all]
#
#   main         ours on the recipes bench/gpt2_124m and bench/llama_1b as shipped, then
#                $BENCH_DIR/torch_reference.py all on the same GPU, then the ratio ours / reference per shape
#                (about 5 minutes on an H100)
#   sweep_gpt2   one run per lever on the gpt2 shape (about 6 minutes), sweep_llama the same for llama_1b
#                (about 8); main first, or the ratio line has no reference to compare with
#   all          main, then both sweeps
#
# Every run is one JSON line appended to $OUT_DIR/ours.jsonl (a failed run, an out-of-memory one say, is a
# line with "error" and the end of its stderr; all stderr goes to $OUT_DIR/stderr/); the reference's lines go
# to reference.jsonl; at the end ratio.jsonl compares every run in ours.jsonl with the reference (the recipe
# as shipped and the best run), and a table of all runs is printed. Parts run in separate calls add up when
# OUT_DIR persists between them. Each run is its own process: XLA flags only apply to a fresh one.
#
# Environment: BENCH_DIR (a copy of ../shared/bench, default .bench), OUT_DIR (default $OUT when set, else
# runs/bench_train), PYTHON (default python3), RUN_TIMEOUT (seconds per run, default 240), STEPS (timed
# steps per run, default 30). Wheels under .whl/ (ml-collections: the GPU image lacks it) are installed
# first; BENCHMARKS.md has the exact commands.
set -u -o pipefail
cd "$(dirname "$0")/.."
PART=${1:-main}
BENCH_DIR=${BENCH_DIR:-.bench}
OUT_DIR=${OUT_DIR:-${OUT:-runs/bench_train}}
PY=${PYTHON:-python3}
VARIANT=${VARIANT:+:$VARIANT}  # VARIANT=tiny: the recipes' CPU-size variants (a smoke run of this script)
mkdir -p "$OUT_DIR/stderr"
export PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU by default; the torch reference may use all of it, so ours may use nearly all too.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if compgen -G '.whl/*.whl' >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llm_jax_site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/llm_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c 'import jax, flax, optax, ml_collections; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())' \
  || exit 1

ours() {  # NAME RECIPE [bench_train.py flags...]
  local name=$1 recipe=$2
  shift 2
  timeout "${RUN_TIMEOUT:-240}" $PY tools/bench_train.py --name="$name" --config="bench/$recipe$VARIANT" \
    --steps="${STEPS:-30}" "$@" 2>"$OUT_DIR/stderr/$name.txt" | tee -a "$OUT_DIR/ours.jsonl"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    $PY - "$name" "$rc" "$OUT_DIR/stderr/$name.txt" "$*" <<'EOF' | tee -a "$OUT_DIR/ours.jsonl"
import json, sys
name, rc, err, flags = sys.argv[1:]
print(json.dumps({'impl': 'llm-jax', 'name': name, 'args': flags, 'error': f'exit {rc}',
                  'stderr': open(err, errors='replace').read()[-600:]}))
EOF
  fi
}

main() {
  ours gpt2_124m gpt2_124m
  ours llama_1b llama_1b
  if [ -f "$BENCH_DIR/torch_reference.py" ]; then
    timeout 600 $PY "$BENCH_DIR/torch_reference.py" all 2>"$OUT_DIR/stderr/reference.txt" \
      | tee "$OUT_DIR/reference.jsonl"
  else
    echo "no $BENCH_DIR/torch_reference.py: copy ../shared/bench there (BENCHMARKS.md)" >&2
  fi
}

# The levers of issue 9, one change from the shipped recipe each (the recipe: bf16 compute over float32
# master weights, the Pallas GPU flash kernel ('auto'; cuDNN is a lever), no remat, scanned layers,
# whole-batch cross-entropy).
sweep() {  # SHAPE LOSS_CHUNK REMAT
  local s=$1
  ours "$s.attention_xla" "$s" --config.model.attention_impl=xla
  ours "$s.attention_cudnn" "$s" --config.model.attention_impl=cudnn
  ours "$s.remat_$3" "$s" --config.model.remat="$3"
  ours "$s.unrolled" "$s" --config.model.scan_layers=false
  ours "$s.loss_chunk_$2" "$s" --config.train.loss_chunk="$2"
  ours "$s.f32_compute" "$s" --config.model.dtype=float32
  for flags in lhs lhs_graphs no_triton_gemm lhs_no_triton_gemm; do
    ours "$s.xla_$flags" "$s" --xla_flags="$flags"
  done
}

case "$PART" in
  main) main ;;
  sweep_gpt2) sweep gpt2_124m 64 save_attention ;;
  sweep_llama) sweep llama_1b 256 save_attention ;;
  all) main; sweep gpt2_124m 64 save_attention; sweep llama_1b 256 save_attention ;;
  *) echo "usage: $0 [main|sweep_gpt2|sweep_llama|all]" >&2; exit 2 ;;
esac

if [ -s "$OUT_DIR/reference.jsonl" ]; then  # every run so far in OUT_DIR against the reference
  $PY tools/bench_train.py --ratio "$OUT_DIR/ours.jsonl" "$OUT_DIR/reference.jsonl" > "$OUT_DIR/ratio.jsonl"
fi
$PY - "$OUT_DIR" <<'EOF'
import json, os, sys
out = sys.argv[1]
def rows(name):
  path = os.path.join(out, name)
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path) if l.strip().startswith('{')]
print(f"\n{'run':36} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'compile s':>9}  note")
for r in rows('ours.jsonl') + rows('reference.jsonl'):
  name = r.get('name') or f"reference {r.get('shape')}"
  print(f"{name:36} {r.get('step_ms') or '':>9} {r.get('tokens_per_sec') or '':>10} {r.get('mfu') or '':>6} "
        f"{r.get('compile_s') or '':>9}  {r.get('error', '')}")
for r in rows('ratio.jsonl'):
  print(f"ratio ours/reference {r['shape']}: {r['ratio']} as shipped, {r['best_ratio']} best ({r['best_name']})")
EOF
