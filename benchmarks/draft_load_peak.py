"""Peak RSS of loading the int8 draft: float32 then quantised (the old way) vs one layer at a time.

    .venv/bin/python benchmarks/draft_load_peak.py [--model demo-0.5b]

Each way runs in a fresh process (peak RSS is per process); prints peak and settled RSS and seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import gc, resource, sys, time, psutil, torch
from specchat.model.loading import load_int8, load_resident, quantize_int8
from specchat.sources.registry import load_registry
from specchat.sources.resolve import materialize, parse_model_spec
path = materialize(parse_model_spec(sys.argv[2], load_registry()))
before = psutil.Process().memory_info().rss
start = time.perf_counter()
if sys.argv[1] == "float32-then-int8":
    lm = quantize_int8(load_resident(path, torch.float32).lm)
else:
    lm = load_int8(path).lm
seconds = time.perf_counter() - start
gc.collect()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"{sys.argv[1]:<20} peak RSS {peak / 1e9:5.2f} GB  settled {psutil.Process().memory_info().rss / 1e9:5.2f} GB  "
      f"(before loading {before / 1e9:4.2f} GB)  {seconds:5.1f} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-0.5b")
    args = parser.parse_args()
    for way in ("float32-then-int8", "int8-layer-by-layer"):
        subprocess.run([sys.executable, "-c", CHILD, way, args.model], check=True)


if __name__ == "__main__":
    main()
