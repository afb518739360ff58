"""The `kvloom` command line.

    kvloom info        version, kernel path, threads, CUDA build
"""
from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    import torch

    import kvloom
    from kvloom import _core

    print(f"kvloom {kvloom.__version__}")
    print(f"  CPU kernels:   {kvloom.kernel_isa()} ({kvloom.get_num_threads()} threads)")
    print(f"  CUDA target:   {'built' if _core.cuda_built else 'not built'}"
          f"{f', {_core.cuda_device_count()} device(s) visible' if _core.cuda_built else ''}")
    print(f"  torch:         {torch.__version__}")
    print(f"  pool default:  {kvloom.default_capacity_bytes() / 2**30:.1f} GiB limit (grows on demand)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvloom", description="kvloom: a KV-cache runtime for transformer decoding")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="show the build: version, kernel path, threads, CUDA").set_defaults(fn=_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
