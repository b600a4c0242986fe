"""Registers, spills and shared memory of the head-wise kernel per launch kind and tile config,
compiled for a GPU architecture on any machine (no GPU needed: Triton compiles for a target and
its bundled ``cuobjdump`` reads the cubin).

Why it matters: on Hopper a 64-row tile with one stage runs two programs per SM only when a program
needs few enough registers, and one program's softmax then overlaps the other's GEMMs (the minimal
kernel of ``benchmarks/d128_schedules.py`` reaches 0.93x cuDNN at FLUX-2K that way). The general
launch (window/arrow rules compiled in) needs every register and spills; the all-full launch does not.
::

    python benchmarks/kernel_resources.py [--arch 90] [--head-dims 128,72] [--configs 64x128/4w/1s/tma,...]
    python benchmarks/kernel_resources.py --window2d [--configs 16x8/8x8/4w/2s,8x8/8x16/4w/2s/tma,...]

The figures are those of the Triton installed here, which may differ from the one on the GPU machine
(Triton 3.6 there; 3.9 beside torch 2.13 here). For its figures, compile under that version in a throwaway venv::

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python benchmarks/kernel_resources.py ...
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from small_shapes import _parse_config  # noqa: E402  (the "128x64/4w/3s/tma" config strings)

DEFAULT_CONFIGS = "128x128/8w/3s/tma,64x128/4w/1s/tma,64x64/4w/3s/tma,128x64/4w/3s,128x64/4w/3s/tma"
LAUNCH_KINDS = {  # name: (ALL_FULL, HAS_RESIDUAL, SUBTRACT)
    "all-full": (True, False, False),
    "mixed": (False, False, False),
    "windowed + R": (False, True, False),
}


def compile_launch(head_dim: int, cfg, all_full: bool, residual: bool, subtract: bool, arch: int):
    """The compiled headwise_fwd_kernel of one launch (contiguous [B, H, L, D] bf16 tensors), with the
    compile-time arguments ditlens' own launch would pass."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ditlens.kernels._triton_impl import headwise_fwd_kernel as fn
    from ditlens.kernels.triton_backend import _launch_constants

    strides = ((8 * head_dim, 4 * head_dim, head_dim, 1),) * 6  # any contiguous [B, H, L, D] (L = 4, H = 2)
    constants = dict(_launch_constants(head_dim, strides, cfg, False, residual, subtract, cfg.tma, all_full,
                                         all_full, cfg.split_full))
    options = {key: constants.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in constants}
    pointer = {"Q", "K", "V", "O", "C", "R"}
    signature = {name: ("constexpr" if name in constants else "*bf16" if name in pointer
                        else "*i32" if name in ("MODE", "WIN", "ORDER", "PART", "CNT")
                        else "*fp32" if name in ("WS", "WML") else "fp32" if name == "qk_scale" else "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_window2d(head_dim: int, cfg, has_text: bool, arch: int):
    """The compiled window2d kernel of one launch (contiguous bf16 tensors) with ditlens' compile-time arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ditlens.kernels._triton_window2d import window2d_fwd_kernel as fn
    from ditlens.kernels.window2d import window2d_launch_constants

    strides = ((16 * head_dim, 4 * head_dim, head_dim, 1),) * 4  # any contiguous [B, H, L, D] (L = 4, H = 4)
    constants = dict(window2d_launch_constants(head_dim, strides, cfg, False, cfg.tma, has_text))
    options = {key: constants.pop(key) for key in ("num_warps", "num_stages")}
    signature = {name: ("constexpr" if name in constants else "*bf16" if name in ("Q", "K", "V", "O")
                        else "*i32" if name == "RAD" else "fp32" if name == "qk_scale" else "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel) -> dict[str, int]:
    """REG / STACK / SHARED of a compiled kernel, from cuobjdump --dump-resource-usage."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(tool), "--dump-resource-usage", cubin], capture_output=True, text=True,
                              check=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", text))
    return {"registers": int(found.get("REG", -1)), "stack_bytes": int(found.get("STACK", -1)),
            "shared_bytes": int(kernel.metadata.shared)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--head-dims", default="128,72")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--kinds", default=",".join(LAUNCH_KINDS), help=f"any of {', '.join(LAUNCH_KINDS)}")
    parser.add_argument("--window2d", action="store_true",
                        help="the window2d kernel instead (configs QRxQC/KRxKC/Nw/Ss[/tma], with and without text)")
    args = parser.parse_args()
    if args.window2d:
        return window2d_table(args)
    kinds = {name: LAUNCH_KINDS[name] for name in args.kinds.split(",")}
    import triton

    print(f"Triton {triton.__version__}, sm_{args.arch}, bf16, contiguous [B, H, L, D]")
    print("| D | launch | config | registers | stack bytes | shared KiB |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for kind, (all_full, residual, subtract) in kinds.items():
            for config in args.configs.split(","):
                try:
                    kernel = compile_launch(head_dim, _parse_config(config), all_full, residual, subtract,
                                            args.arch)
                    r = resources(kernel)
                except Exception as exc:  # e.g. shared memory over the limit: a row that says so
                    print(f"| {head_dim} | {kind} | {config} | failed: {str(exc).splitlines()[0][:80]} | | |")
                    continue
                print(f"| {head_dim} | {kind} | {config} | {r['registers']} | {r['stack_bytes']} | "
                      f"{r['shared_bytes'] / 1024:.0f} |", flush=True)


def window2d_table(args: argparse.Namespace) -> None:
    import triton

    from window2d import parse_config  # benchmarks/window2d.py

    configs = args.configs if args.configs != DEFAULT_CONFIGS else WINDOW2D_CONFIGS
    print(f"Triton {triton.__version__}, sm_{args.arch}, bf16, contiguous [B, H, L, D], window2d kernel")
    print("| D | text | config | registers | stack bytes | shared KiB |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for has_text in (False, True):
            for config in configs.split(","):
                try:
                    r = resources(compile_window2d(head_dim, parse_config(config), has_text, args.arch))
                except Exception as exc:
                    print(f"| {head_dim} | {has_text} | {config} | failed: {str(exc).splitlines()[0][:80]} | | |")
                    continue
                print(f"| {head_dim} | {has_text} | {config} | {r['registers']} | {r['stack_bytes']} | "
                      f"{r['shared_bytes'] / 1024:.0f} |", flush=True)


WINDOW2D_CONFIGS = "16x8/8x8/4w/2s,8x8/8x16/4w/2s,8x8/8x8/4w/3s,16x8/8x8/4w/2s/tma,8x8/8x16/4w/2s/tma"


if __name__ == "__main__":
    main()
