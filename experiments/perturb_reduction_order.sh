#!/usr/bin/env bash
# Runs the tests that compare two computations of the same update (1 vs several devices, 1 vs 2
# processes, micro-batched vs whole batch, remat vs not, bf16 vs float32, eager vs jitted, resumed
# vs uninterrupted, ours vs the official float32 run) under XLA settings that change float32
# reduction order, as another CPU's kernels would: XLA:CPU without XNNPACK, single-threaded Eigen,
# and 4 or 2 fake devices instead of 8. Each must pass under every setting.
#
#   experiments/perturb_reduction_order.sh [PYTHON]     (default: python; logs in $OUT_DIR or /tmp)
#
# Records: experiments/RESULTS.md, "Reduction order" (which CPU, which settings, the outcome).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
OUT_DIR=${OUT_DIR:-/tmp/perturb_reduction_order}
mkdir -p "$OUT_DIR"

# Every comparison test; the ones below need exactly 8 devices, so the 4- and 2-device runs
# take the subset that runs on any device count.
ALL=(tests/test_sfd_step.py tests/test_step_options.py tests/test_scan.py tests/test_multihost.py
     tests/test_stage2.py::test_iteration_equals_its_float64_rerun
     tests/test_stage2.py::test_second_stage_accumulation_on_two_devices_equals_full_batch
     tests/test_stage2.py::test_second_stage_bfloat16_with_accumulation_on_two_devices
     tests/test_train.py::test_sigkill_and_resume_equals_uninterrupted)
ANY_COUNT=(tests/test_sfd_step.py tests/test_step_options.py
           tests/test_stage2.py::test_second_stage_accumulation_on_two_devices_equals_full_batch
           tests/test_stage2.py::test_second_stage_bfloat16_with_accumulation_on_two_devices)
ANY_COUNT_K='not sfdv_draws and not class_labels'  # these two build an 8-device step

grep -m1 'model name' /proc/cpuinfo
"$PY" -c 'import jax; print("jax", jax.__version__)'
status=0
run() {  # run NAME XLA_FLAGS PYTEST_ARGS...
  local name=$1 flags=$2
  shift 2
  local start=$SECONDS
  if XLA_FLAGS="$flags" "$PY" -m pytest -q -s -p no:randomly "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "$name: passed ($(tail -1 "$OUT_DIR/$name.log")) in $((SECONDS - start)) s"
  else
    echo "$name: FAILED ($(tail -1 "$OUT_DIR/$name.log")) in $((SECONDS - start)) s; log: $OUT_DIR/$name.log"
    status=1
  fi
  grep -h 'max |param\|relative gradient difference\|gradient signs forced' "$OUT_DIR/$name.log" | sed 's/^/    /'
}

run default '' -n 2 --dist loadfile "${ALL[@]}"
run no_xnnpack '--xla_cpu_use_xnnpack=false' -n 2 --dist loadfile "${ALL[@]}"
run eigen_single_thread '--xla_cpu_multi_thread_eigen=false' -n 2 --dist loadfile "${ALL[@]}"
run devices_4 '--xla_force_host_platform_device_count=4' -n 2 --dist loadfile "${ANY_COUNT[@]}" -k "$ANY_COUNT_K"
run devices_2 '--xla_force_host_platform_device_count=2' -n 2 --dist loadfile "${ANY_COUNT[@]}" -k "$ANY_COUNT_K"
exit $status
