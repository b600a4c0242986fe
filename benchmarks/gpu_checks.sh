#!/usr/bin/env bash
# The GPU checks the open issues wait on, in one script that fits device calls of <= 600 s.
#
#   bash benchmarks/gpu_checks.sh OUTDIR PART...
#
# PART: tests | tests-runtime | tests-rest | graphs | e2e-graphs | e2e-graphs-sd3 | overhead | pairs | v1 | v2 | e2e-small | e2e-sd3 | e2e-profile | e2e-profile-sd3 | e2e-profile-dit | e2e-profile-dit-graphs | e2e-dit | e2e-dit-lowered | e2e-dit-null | e2e-dit-eager | e2e-dit-eager-b | e2e-dit-eager-noasc | e2e-2k-pixart | e2e-2k-flux | tiles-2k | tiles-flux | kernels | h100-128 | kernels-2k | kernels-1k | baselines | short-mixed | split-mixed | split-dense | split-branch | d64 | qo72 | rt128 | window2d | small-shapes | e2e-refresh | d128 | tiles-rows | poly | cached-launch | launch-host | launch-profile | validate-graphs | gluon | gluon-order.
# Each part writes OUTDIR/PART.log
# (and its result files) and is cut at its own time limit, so one slow part cannot eat a call.
# Results files land in benchmarks/results/ as the scripts write them; copy them back from OUTDIR.
# The GPU machine lacks diffusers and transformers: `bash benchmarks/device_wheels.sh` builds the wheels to carry
# (.whl) and says how to install them there.
set -u -o pipefail
out=${1:?usage: gpu_checks.sh OUTDIR PART...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s"
  tr '\r' '\n' < "$out/$name.log" | grep -v -E 'it/s\]|s/it\]|clean_caption|eautiful|^$' | tail -n "${TAIL:-25}"
}

for name in "$@"; do
  case $name in
    tests) part tests 420 python3 -m pytest -q -m gpu tests ;;  # ~230 s warm; Triton compiles take longer on a fresh machine
    tests-runtime) part tests-runtime 480 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_compress.py ;;
    tests-rest) part tests-rest 300 python3 -m pytest -q -m gpu tests --ignore=tests/test_kernels.py \
                  --ignore=tests/test_compress.py ;;  # with tests-runtime: the whole GPU suite in two parts on a cold machine
    graphs) part graphs 200 python3 -m pytest -q -m gpu tests/test_graphs.py ;;
    e2e-graphs) part e2e-graphs 420 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512,pixart-sigma-xl-1024 \
                  --cuda-graphs --repeats 3 --out "$out/e2e_graphs.json" ;;
    e2e-graphs-sd3) part e2e-graphs-sd3 420 python3 benchmarks/e2e.py --device cuda --models sd3-medium-1024,flux-dev-1024 \
                      --cuda-graphs --repeats 3 --out "$out/e2e_graphs_sd3_flux.json" ;;
    e2e-dit) part e2e-dit 300 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512 --cuda-graphs --repeats 3 \
               --out "$out/e2e_dit.json" ;;
    e2e-dit-lowered) part e2e-dit-lowered 300 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512 \
                       --cuda-graphs --repeats 3 --lower-unprofitable --out "$out/e2e_dit_lowered.json" ;;
    e2e-dit-null) part e2e-dit-null 300 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512 --cuda-graphs \
                    --repeats 3 --null-plan --lower-unprofitable --out "$out/e2e_dit_null.json" ;;
    e2e-dit-eager) part e2e-dit-eager 420 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512 \
                     --repeats 15 --null-plan --lower-unprofitable --out "$out/e2e_dit_eager.json" ;;  # eager only, 15 pairs a row (~230 s)
    e2e-dit-eager-b) part e2e-dit-eager-b 420 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512 \
                       --repeats 15 --null-plan --lower-unprofitable --out "$out/e2e_dit_eager_b.json" ;;  # a second run to pool (benchmarks/pool_pairs.py)
    e2e-dit-eager-noasc) part e2e-dit-eager-noasc 420 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512 \
                           --repeats 15 --null-plan --lower-unprofitable --drop-asc --out "$out/e2e_dit_eager_noasc.json" ;;  # the same plans without +asc
    e2e-2k-pixart) part e2e-2k-pixart 540 python3 benchmarks/e2e.py --device cuda --models pixart-sigma-xl-2048 \
                     --out "$out/e2e_2k_pixart.json" ;;
    e2e-2k-flux) part e2e-2k-flux 540 python3 benchmarks/e2e.py --device cuda --models flux-dev-2048 \
                   --out "$out/e2e_2k_flux.json" ;;
    pairs) part pairs 60 python3 benchmarks/pair_stats.py --device cuda ;;
    overhead) part overhead 240 python3 benchmarks/profile_overhead.py --model pixart-sigma-xl --device cuda \
                --steps 20 --repeats 2 --variants default,o-l1 ;;
    v1) part v1 420 python3 benchmarks/search.py --model pixart-sigma-xl --device cuda --v1-only \
          --v1-naive-steps 3 --v1-micro-batch 2 --v1-every-candidate --v1-floor
        cp benchmarks/results/search_pixart-sigma-xl.json "$out/" 2>/dev/null ;;
    v2) part v2 300 python3 benchmarks/search.py --model pixart-sigma-xl --device cuda --v2-only  # ~150 s on the H200
        cp benchmarks/results/search_pixart-sigma-xl.json "$out/" 2>/dev/null ;;
    e2e-small) part e2e-small 540 python3 benchmarks/e2e.py --device cuda --models dit-xl-2-512,pixart-sigma-xl-1024 \
                 --compile --repeats 3 --out "$out/e2e_small.json" ;;
    e2e-sd3) part e2e-sd3 400 python3 benchmarks/e2e.py --device cuda --models sd3-medium-1024 \
               --compile --repeats 3 --out "$out/e2e_sd3.json" ;;
    e2e-profile) part e2e-profile-pixart 150 python3 benchmarks/e2e_profile.py --model pixart-sigma-xl-1024 --fraction 0.52
                 part e2e-profile-dit 120 python3 benchmarks/e2e_profile.py --model dit-xl-2-512 --fraction 0.49 ;;
    e2e-profile-sd3) part e2e-profile-sd3 150 python3 benchmarks/e2e_profile.py --model sd3-medium-1024 --fraction 0.32 ;;
    e2e-profile-dit) part e2e-profile-dit-eager 150 python3 benchmarks/e2e_profile.py --model dit-xl-2-512 --fraction 0.34
                     part e2e-profile-dit-graphs 150 python3 benchmarks/e2e_profile.py --model dit-xl-2-512 \
                       --fraction 0.34 --cuda-graphs ;;
    e2e-profile-dit-graphs) part e2e-profile-dit-graphs 150 python3 benchmarks/e2e_profile.py --model dit-xl-2-512 \
                              --fraction 0.34 --cuda-graphs ;;
    tiles-2k) part tiles-2k 240 python3 benchmarks/small_shapes.py --out "$out/tiles_2k" --shapes PixArt-2K \
                --window-sparsity 0.5 --variants dense,window \
                --configs 128x64/4w/3s,128x64/4w/4s,128x32/4w/3s,64x64/4w/3s,128x64/8w/3s,128x128/8w/3s,128x64/4w/3s/tma ;;
    tiles-flux) part tiles-flux 400 python3 benchmarks/small_shapes.py --out "$out/tiles_flux" --shapes FLUX-2K \
                  --window-sparsity 0.5 --variants dense,window \
                  --configs 128x128/8w/3s/tma,128x128/8w/3s/tma/ws,128x128/8w/2s/tma/ws,128x64/4w/3s/tma/ws,128x128/4w/3s/tma/ws,128x64/8w/3s/tma/ws,128x128/8w/3s/ws ;;
    h100-128) for s in 0.5 0.75; do  # the D = 128 defaults came from H200 sweeps; FLUX-2K misses more on the H100
                part "h100-128-$s" 270 python3 benchmarks/small_shapes.py --out "$out/h100_128_$s" --shapes FLUX-2K \
                  --window-sparsity "$s" --variants dense,arrow \
                  --configs 64x128/4w/1s/tma/r168/1l,64x128/4w/1s/tma/1l,64x128/4w/2s/tma/1l,128x128/8w/2s/tma/1l,128x128/8w/3s/tma/1l,128x64/4w/3s/tma/1l
              done ;;
    kernels) part kernels 540 python3 benchmarks/kernels.py --out "$out/kernels" ;;
    gluon-order) part gluon-order-tests 240 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_compress.py -k gluon
                 # the Gluon launch's tile orders (grid, full-first, longest) in interleaved rounds (~90 s)
                 part gluon-order 240 python3 benchmarks/tile_order_ab.py --out "$out/tile_order" --rounds 7 ;;
    gluon) part gluon 360 python3 benchmarks/gluon_attention.py --timeout 60 --out "$out/gluon" ;;  # the Gluon D = 128 kernel against SDPA and the Triton launch: dense, arrow 50 / 75 / 90 % and the mixed plan (the API's tile order), WA-RS apply
    d128) part d128 300 python3 benchmarks/d128_schedules.py --out "$out/d128" ;;
    tiles-rows) for s in 0.5 0.75; do  # windowed launches at the 2K shapes: one loop per segment (/1l) against three
                  part "tiles-rows-flux-$s" 200 python3 benchmarks/small_shapes.py --out "$out/tiles_rows_flux_$s" \
                    --shapes FLUX-2K --window-sparsity "$s" --variants window,arrow \
                    --configs 128x128/8w/3s/tma,128x128/8w/3s/tma/1l,64x128/4w/1s/tma/r168/1l
                  part "tiles-rows-pixart-$s" 200 python3 benchmarks/small_shapes.py --out "$out/tiles_rows_pixart_$s" \
                    --shapes PixArt-2K --window-sparsity "$s" --variants window \
                    --configs 128x64/4w/3s,128x64/4w/3s/1l,128x64/4w/3s/tma/1l
                done ;;
    kernels-2k) part kernels-2k 300 python3 benchmarks/kernels.py --no-tune --shapes PixArt-2K FLUX-2K \
                  --out "$out/kernels_2k" ;;
    short-mixed) part short-mixed 200 python3 benchmarks/small_shapes.py --out "$out/short_mixed" --shapes DiT-512,PixArt-1K \
                   --window-sparsity 0.75 --variants dense,window,mixed \
                   --configs 128x64/4w/3s/tma/1l,128x64/4w/3s,64x64/4w/2s,64x64/4w/2s/tma/1l,64x64/4w/3s/tma/1l,128x64/8w/3s/tma/1l ;;  # 8w: no spill (Triton 3.6)
    split-mixed) part split-tests 300 python3 -m pytest -q -m gpu tests/test_kernels.py -k split_full  # ~12 new compiles
                 part split-mixed-72 300 python3 benchmarks/small_shapes.py --out "$out/split_mixed_72" --model \
                   --shapes DiT-512,PixArt-1K --window-sparsity 0.75 --variants dense,mixed \
                   --configs 128x64/4w/3s/tma/1l,128x64/4w/3s/tma/1l/sk2,128x64/4w/3s/tma/1l/sk4,128x64/4w/3s/tma/1l/sk3h2,128x64/4w/3s/tma/1l/sk6h2,128x64/4w/3s/tma/1l/sk7h2,128x64/4w/3s/tma/1l/sk8h2 ;;
    split-dense) part split-dense-128 300 python3 benchmarks/small_shapes.py --out "$out/split_dense_128" --model \
                   --shapes FLUX-1K,FLUX-2K --window-sparsity 0.75 --variants dense \
                   --configs 64x128/4w/1s/tma,64x128/4w/1s/tma/r168,64x128/4w/1s/tma/r168/sk2h2,64x128/4w/1s/tma/r168/sk2h4,64x128/4w/1s/tma/r168/sk3h2,64x128/4w/1s/tma/r168/sk2h1,64x128/4w/1s/tma/r168/sk5h2,64x128/4w/1s/tma/r168/sk8h2
                 part split-dense-64 200 python3 benchmarks/small_shapes.py --out "$out/split_dense_64" --model \
                   --shapes SD3-1K --variants dense \
                   --configs 128x64/4w/3s,128x64/4w/3s/sk2h2,128x64/4w/3s/sk4h2,128x64/4w/3s/sk5h2,128x64/4w/3s/sk8h2
                 part split-mixed-128 200 python3 benchmarks/small_shapes.py --out "$out/split_mixed_128" --model \
                   --shapes FLUX-1K --window-sparsity 0.75 --variants mixed \
                   --configs 64x128/4w/1s/tma/r168/1l,64x128/4w/1s/tma/r168/1l/sk2,64x128/4w/1s/tma/r168/1l/sk2h4 ;;
    split-branch) part split-branch-128 200 python3 benchmarks/small_shapes.py --out "$out/split_branch_128" --model \
                    --shapes FLUX-1K,FLUX-2K --window-sparsity 0.75 --variants dense \
                    --configs 64x128/4w/1s/tma/r168,64x128/4w/1s/tma/r168/sk2h2,64x128/4w/1s/tma/r168/sk2h2b,64x128/4w/1s/tma/r168/sk2h4b,64x128/4w/1s/tma/r168/sk5h2b,64x128/4w/1s/tma/r168/sk8h2b
                  part split-branch-64 150 python3 benchmarks/small_shapes.py --out "$out/split_branch_64" --model \
                    --shapes SD3-1K --variants dense --configs 128x64/4w/3s,128x64/4w/3s/sk2h2,128x64/4w/3s/sk2h2b ;;
    # D = 64 (SD3, CogVideoX): the default's pointer loads spill (Triton 3.6), descriptor configs do not
    d64) part d64 240 python3 benchmarks/small_shapes.py --out "$out/d64" --shapes SD3-1K --window-sparsity 0.75 \
           --variants dense,window,arrow,mixed,W+R \
           --configs 128x64/4w/3s,128x64/4w/3s/tma/1l,128x64/4w/3s/tma,128x64/4w/2s/tma/1l,64x64/4w/3s/tma/1l,128x128/8w/3s/tma/1l ;;
    qo72) part qo72-tests 300 python3 -m pytest -q -m gpu tests/test_kernels.py \
            -k "matches_reference_and_writes or all_full_launch or warsr_residual"  # the /qo configs on the GPU first
          part qo72 300 python3 benchmarks/small_shapes.py --out "$out/qo72" --shapes DiT-512,PixArt-1K,PixArt-2K \
            --window-sparsity 0.75 --variants dense,window,mixed,W+R,R=O-W \
            --configs 128x64/4w/3s/tma/1l,128x64/4w/3s/tma/1l/qo,128x64/4w/3s/tma/1l/qo/rt,64x64/4w/3s/tma/1l,64x64/4w/3s/tma/1l/qo ;;
    rt128) part rt128 240 python3 benchmarks/small_shapes.py --out "$out/rt128" --shapes FLUX-1K,FLUX-2K \
             --window-sparsity 0.75 --variants W+R,R=O-W --configs 64x128/4w/1s/tma/r168/1l,64x128/4w/1s/tma/r168/1l/rt ;;
    window2d) part window2d-tests 200 python3 -m pytest -q -m gpu tests/test_window2d.py
              part window2d 300 python3 benchmarks/window2d.py --out "$out/window2d" \
                --configs 16x8/8x8/4w/2s/tma,8x8/8x16/4w/2s/tma,8x8/8x8/4w/3s,8x8/8x8/4w/3s/tma,16x8/8x16/8w/2s ;;
    baselines) part baselines 150 python3 benchmarks/kernels.py --baselines --out "$out/baselines" ;;
    kernels-1k) part kernels-1k 200 python3 benchmarks/kernels.py --no-tune --shapes PixArt-1K FLUX-1K SD3-1K DiT-512 \
                  --out "$out/kernels_1k" ;;
    e2e-refresh) part e2e-refresh-one-pass 300 python3 benchmarks/e2e.py --device cuda --cuda-graphs --repeats 3 \
                   --models dit-xl-2-512,pixart-sigma-xl-1024 --warsr-refresh one-pass --out "$out/e2e_graphs_one_pass.json" ;;
    poly) part poly-d128 200 python3 benchmarks/d128_schedules.py --out "$out/poly_d128" --variants \
            base/64x128/4w/1s+devdesc+qodesc,base/64x128/4w/1s+devdesc+qodesc+poly2,base/64x128/4w/1s+devdesc+qodesc+poly4,base/128x128/8w/3s+devdesc+qodesc,base/128x128/8w/3s+devdesc+qodesc+poly4
          for s in 0.75 0.5; do  # ½ / ¼ of the exponentials by polynomial (KernelConfig.poly_exp) in ditlens' own launches
            part "poly-flux-$s" 240 python3 benchmarks/small_shapes.py --out "$out/poly_flux_$s" --shapes FLUX-2K \
              --window-sparsity "$s" --variants dense,arrow,mixed \
              --configs 64x128/4w/1s/tma/r168/1l,64x128/4w/1s/tma/r168/1l/p2,64x128/4w/1s/tma/r168/1l/p4
          done
          part poly-pixart-0.5 200 python3 benchmarks/small_shapes.py --out "$out/poly_pixart_0.5" --shapes PixArt-2K \
            --window-sparsity 0.5 --variants dense,window --configs 128x64/4w/3s/tma/1l,128x64/4w/3s/tma/1l/p2,128x64/4w/3s/tma/1l/p4
          part poly-tests 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k poly ;;
    cached-launch) part cached-launch-test 200 python3 -m pytest -q -m gpu tests/test_kernels.py -k "cached_launches or cached_one_pass" ;;
    launch-host) part launch-host 120 python3 benchmarks/launch_host.py ;;  # host µs per call: SDPA, Triton dispatch, launch cache
    launch-profile) part launch-profile 120 python3 benchmarks/launch_host.py --shapes DiT-512 --profile 30 ;;
    validate-graphs) part validate-graphs-test 200 python3 -m pytest -q -m gpu tests/test_compress.py -k cuda_graphs ;;
    small-shapes) part small-shapes 300 python3 benchmarks/small_shapes.py --out "$out" ;;
    *) echo "unknown part $name" >&2 ;;
  esac
done
echo "total $SECONDS s"
