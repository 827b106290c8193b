"""Where the CPU goes during a streamed target pass: per-thread user/sys seconds per pass (1 and 16
tokens), demo target streamed with --ram-budget 770MB, no draft.

    .venv/bin/python benchmarks/stream_cpu.py                       # as torch runs by default
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/stream_cpu.py

Then a draft beside a pass: benchmarks/draft_beside_pass.py.
"""
import os, time, torch
from specchat import RunConfig
from specchat.app.loader import load_pipeline
from specchat.model.lm import causal_visibility
config = RunConfig(model="demo", draft="none", offload="ssd", budget=16, ram_budget=770_000_000, method="ar")
p = load_pipeline(config, print, calibrate=False)
target = p.engine.target
ids = list(range(100, 300))
P = len(ids)
tcache = target.new_cache()
target.forward(torch.tensor(ids), torch.arange(P), causal_visibility(0, P), tcache, logit_rows=torch.tensor([P - 1]))
def task_times():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[tid] = (name, int(f[11]), int(f[12]))
        except FileNotFoundError: pass
    return out
def tp(n):
    L = tcache.length
    target.forward(torch.randint(0, 1000, (n,)), torch.arange(L, L + n), causal_visibility(L, n), tcache)
    tcache.crop(L)
tp(1); tp(1)
for n in (1, 16):
    a = task_times(); w = time.perf_counter()
    for _ in range(4): tp(n)
    w = time.perf_counter() - w; b = task_times()
    print(f"n={n} wall/pass {w/4:.3f}")
    for tid, (name, u, s) in b.items():
        if tid in a:
            du, ds = u - a[tid][1], s - a[tid][2]
            if du + ds: print(f"   {tid} {name}: user {du/100/4:.3f} sys {ds/100/4:.3f} per pass")
