"""Capture cost: the whole default size ladder captured up front (largest first), time and graph memory.

Exits non-zero when a size fails to capture (it would run eagerly).

    python scripts/bench_capture.py --model qwen3-8b

Writes ``results/capture/capture_<model>.{json,md}`` (``--out-dir``, ``--out-name``) and ends by naming them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

import bcg
from benchutil import Bench, add_common_arguments, output_stem, speed_caveat, wrap_options
from report import print_written, write_results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "capture")
    args = parser.parse_args(argv)
    bench = Bench.start(args, {}, {})
    device, model_name = bench.device, bench.name
    free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    start = time.perf_counter()
    handle = bcg.wrap_model(bench.model, lazy=False, **wrap_options(args, device))
    wall = time.perf_counter() - start
    stats = handle.stats()
    free_after = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    row = {
        "model": model_name,
        "sizes": len(stats["captured"]),
        "largest": max(stats["captured"]),
        "capture_s": stats["capture_seconds"],
        "wrap_wall_s": round(wall, 2),
        "graph_mib": round(stats["graph_bytes"] / 2**20, 1),
        "bridge_mib": round(stats["bridge_bytes"] / 2**20, 1),
        "device_mem_used_mib": round((free_before - free_after) / 2**20, 1),
        "failures": len(stats["capture_failures"]),
    }
    title = f"bcg capture of the default ladder: {model_name}"
    written = write_results(output_stem(args, "capture", model_name), title, [row], extra={"stats": stats},
                            out_dir=args.out_dir, caveat=speed_caveat(device))
    for size, reason in stats["capture_failures"].items():
        print(f"CAPTURE FAILED at {size}: {reason}")
    print_written(written)
    return 1 if stats["capture_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
