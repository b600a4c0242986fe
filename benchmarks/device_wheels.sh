#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, triton, numpy, scipy and h5py but no diffusers/transformers and no
# package index, small enough to travel with the working tree (the device tool's limit is 64 MiB in all).
#
#   bash benchmarks/device_wheels.sh [DIR]          # default DIR: .whl (git-ignored)
#
# On the GPU machine, from the repository root (DIR carried along):
#   python -m pip install --no-deps --no-index DIR/*.whl && python -m pip uninstall -y peft
#   export PYTHONPATH=$PWD
# `python -m pip`: the machine's bare `pip` belongs to another interpreter. peft, if preinstalled, imports
# transformers models that the trimmed wheel below leaves out. WITH_XFORMERS=1 adds xformers' PyPI wheel (3 MB),
# so that benchmarks/kernels.py can report whether its CUDA operators load against the machine's torch (0.0.35's
# do not load against torch 2.11 + CUDA 13: session 36); without it the column reads nan.
set -euo pipefail
dir=${1:-.whl}
py=3.12  # the GPU machine's Python
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux1_x86_64)
get() { pip download -q --only-binary=:all: --python-version "$py" --implementation cp "${platforms[@]}" \
          --no-deps -d "$dir" "$@"; }

get diffusers==0.42.1 transformers==5.25.0
if [ "${WITH_XFORMERS:-0}" = 1 ]; then get xformers==0.0.35; fi
# what diffusers, transformers and huggingface_hub import, resolved against the wheels already here
get huggingface_hub==2.4.0 safetensors==0.8.0 tokenizers==0.23.3 regex tqdm pyyaml filelock requests urllib3 idna \
    certifi charset_normalizer importlib_metadata zipp pillow packaging typing_extensions fsspec httpx httpcore \
    anyio h11 sniffio shellingham typer click
for _ in $(seq 1 15); do
  missing=$(pip install --dry-run -q --no-index --find-links "$dir" --python-version "$py" "${platforms[@]}" \
              --only-binary=:all: --target /tmp/device_wheels_dry huggingface_hub safetensors tokenizers regex tqdm \
              pyyaml requests importlib_metadata pillow typer 2>&1 | sed -n 's/.*No matching distribution found for //p' \
              | head -1 || true)
  [ -z "$missing" ] && break
  get "$missing"
done

# huggingface_hub lists hf_xet (4 MB), which only its Xet downloads import: none on a machine without a network.
# The carry limit is 64 MiB with the tracked files (30 MB in session 36).
rm -f "$dir"/hf_xet-*.whl

# transformers ships ~570 model folders (61 MB unpacked); the benchmarks need the text encoders (T5, CLIP) and
# what diffusers' pipelines import at module level.
keep="t5 clip auto umt5 encoder_decoder siglip siglip2 clip_vision dinov2_with_registers vit_mae"
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$dir"/transformers-*.whl)
for model in "$tmp"/transformers/models/*/; do
  name=$(basename "$model")
  [[ " $keep " == *" $name "* ]] || rm -rf "$model"
done
wheel=$(ls "$dir"/transformers-*.whl)
rm "$wheel"
(cd "$tmp" && zip -q -r -9 "$wheel" transformers transformers-*.dist-info)
rm -rf "$tmp"
du -sh "$dir"
