#!/usr/bin/env bash
# One GPU run (about 8 minutes at most) measuring sfd_jax against the official SFD code.
#
#   experiments/gpu_bench.sh OFFICIAL_SFD_MAIN_DIR          # results under $OUT (default gpu_bench_out/)
#
# Needs jax (CUDA) and torch (CUDA) installed, and a checkout of the official code's sfd-main
# folder (zju-pi/diff-sampler) reachable on the GPU machine: it is not part of this repository,
# so carry it there yourself, e.g. as an untracked folder of the work tree such as
# shared/sfd-main (never committed). Writes, under $OUT:
#   official.json / .log           the official iteration alone, their fp16 setting, batch 128
#   train_fp32_vs_official.json    sfd_jax float32 and the official code, alternating, batch 128:
#                                  compile time, s/kimg, peak memory, ratio, MFU
#   train_bf16.json                sfd_jax bfloat16, batch 128 (needs the step's dtype option)
#   sample_nfe2.json               student sampling images/s at NFE 2
#   summary.md                     the figures above in one table
# Each stage has its own time limit (seconds, overridable), so one slow stage (e.g. a long
# compile) does not lose the others' results.
set -u
OFFICIAL=${1:?usage: experiments/gpu_bench.sh OFFICIAL_SFD_MAIN_DIR}
OUT=${OUT:-gpu_bench_out}
BATCH=${BATCH:-128}
ROUNDS=${ROUNDS:-4}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # H200 (and H100 SXM) dense bf16/fp16 tensor-core peak
T_OFFICIAL=${T_OFFICIAL:-90} T_FP32=${T_FP32:-240} T_BF16=${T_BF16:-150} T_SAMPLE=${T_SAMPLE:-60}
SAMPLE_BATCH=${SAMPLE_BATCH:-1024} SAMPLE_ITERS=${SAMPLE_ITERS:-20}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
# torch and jax share the GPU (one works while the other waits): no preallocation by jax.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'without CUDA')"
  date -u; } > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

stage() {  # name limit command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
}

COMMON=(--official="$OFFICIAL" --batch="$BATCH" --rounds="$ROUNDS" --peak_tflops="$PEAK_TFLOPS")
stage official "$T_OFFICIAL" python experiments/bench_vs_official.py "${COMMON[@]}" --only=official \
    --json="$OUT/official.json"
stage train_fp32_vs_official "$T_FP32" python experiments/bench_vs_official.py "${COMMON[@]}" \
    --json="$OUT/train_fp32_vs_official.json"
stage train_bf16 "$T_BF16" python experiments/bench_vs_official.py "${COMMON[@]}" --only=sfd_jax \
    --jax_dtype=bfloat16 --json="$OUT/train_bf16.json"
stage sample_nfe2 "$T_SAMPLE" python experiments/bench_sample_student.py --batch="$SAMPLE_BATCH" --iters="$SAMPLE_ITERS" \
    --json="$OUT/sample_nfe2.json"

python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
load = lambda n: json.loads((out / n).read_text()) if (out / n).exists() else None
rows = ['| run | compile s | s/kimg | kimg/s | peak GB | MFU |', '|---|---|---|---|---|---|']
official = None
for name in ('official.json', 'train_fp32_vs_official.json', 'train_bf16.json'):
  res = load(name)
  for impl, r in ((res or {}).get('impls') or {}).items():
    if impl == 'official':
      official = official or r
    mem = r.get('peak_device_gb') or r.get('peak_rss_gb')
    rows.append(f"| {name[:-5]}: {impl} {r['dtype']} | {r['setup_s']:.1f} | {r['s_per_kimg']:.2f} | "
                f"{1 / r['s_per_kimg']:.3f} | {mem:.1f} | {r.get('mfu', 0):.1%} |")
lines = ['# GPU benchmark', '', (out / 'versions.txt').read_text(), ''] + rows
pair = load('train_fp32_vs_official.json')
if pair and 'speed_ratio' in pair:
  o, j = pair['impls']['official'], pair['impls']['sfd_jax']
  lines.append(f"\nsfd_jax {j['dtype']} / official {o['dtype']} speed (alternating, same run): "
               f"{pair['speed_ratio']:.2f}x (goal >= 2x)")
bf16 = load('train_bf16.json')
if bf16 and official:
  r = bf16['impls']['sfd_jax']
  lines.append(f"sfd_jax {r['dtype']} / official {official['dtype']} speed (separate runs): "
               f"{official['s_per_kimg'] / r['s_per_kimg']:.2f}x (goal >= 2x)")
s = load('sample_nfe2.json')
if s:
  lines.append(f"\nstudent sampling NFE {s['nfe']}, batch {s['batch']}: compile {s['compile_s']:.1f} s, "
               f"{s['images_per_s']:.0f} images/s")
(out / 'summary.md').write_text('\n'.join(lines) + '\n')
print('\n'.join(lines))
EOF
