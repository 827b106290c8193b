"""A self-draft step (int8, width 1) alone and on a thread beside streamed target passes (16 tokens),
at nice 0 and nice +N; then the target pass's wall/user/sys seconds and the draft step's.

    .venv/bin/python benchmarks/draft_beside_pass.py 10
"""
import os, sys, threading, time, statistics
import torch
from specchat import RunConfig
from specchat.app.loader import load_pipeline
from specchat.model.lm import causal_visibility

nice = int(sys.argv[1]) if len(sys.argv) > 1 else 10
config = RunConfig(model="demo", draft="self:int8", offload="ssd", budget=16, ram_budget=770_000_000)
p = load_pipeline(config, print, calibrate=False)
eng = p.engine
target, draft = eng.target, eng.draft
tok = p.tokenizer
ids = p.encode_chat([{"role": "user", "content": "Explain how a hash map works, with an example in Python."}])
P = len(ids)
tcache = target.new_cache()
target.forward(torch.tensor(ids), torch.arange(P), causal_visibility(0, P), tcache, logit_rows=torch.tensor([P - 1]))
dcache = draft.new_cache()
draft.forward(torch.tensor(ids), torch.arange(P), causal_visibility(0, P), dcache, logit_rows=torch.tensor([P - 1]))

def target_pass(n=16):
    L = tcache.length
    x = torch.randint(0, 1000, (n,))
    vis = causal_visibility(L, n)
    t = time.perf_counter()
    target.forward(x, torch.arange(L, L + n), vis, tcache)
    tcache.crop(L)
    return time.perf_counter() - t

def draft_step(w=1):
    L = dcache.length
    x = torch.randint(0, 1000, (w,))
    t = time.perf_counter()
    draft.forward(x, torch.arange(L, L + w), causal_visibility(L, w), dcache)
    dcache.crop(L)
    return time.perf_counter() - t

for _ in range(2): target_pass(); draft_step()
alone_t = [target_pass() for _ in range(4)]
alone_d = [draft_step() for _ in range(10)]
print(f"alone: target pass {statistics.median(alone_t):.3f} s, draft step {statistics.median(alone_d)*1000:.0f} ms")

def run_concurrent(nice_value, width=1):
    stop = threading.Event(); steps = []
    def worker():
        if nice_value:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice_value)
        while not stop.is_set():
            steps.append(draft_step(width))
    th = threading.Thread(target=worker); th.start()
    time.sleep(0.3)
    ts = [target_pass() for _ in range(4)]
    stop.set(); th.join()
    print(f"nice {nice_value} width {width}: target pass {statistics.median(ts):.3f} s, draft step {statistics.median(steps)*1000:.0f} ms ({len(steps)} steps)")

run_concurrent(0)
run_concurrent(nice)
run_concurrent(nice, 4)

import resource
def cpu(): r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime, r.ru_stime
u0, s0 = cpu(); w0 = time.perf_counter()
for _ in range(4): target_pass()
u1, s1 = cpu(); w1 = time.perf_counter()
print(f"target pass x4: wall {w1-w0:.2f} user {u1-u0:.2f} sys {s1-s0:.2f}")
u0, s0 = cpu(); w0 = time.perf_counter()
for _ in range(4): target_pass(1)
u1, s1 = cpu(); w1 = time.perf_counter()
print(f"target 1-token pass x4: wall {w1-w0:.2f} user {u1-u0:.2f} sys {s1-s0:.2f}")
u0, s0 = cpu(); w0 = time.perf_counter()
for _ in range(10): draft_step()
u1, s1 = cpu(); w1 = time.perf_counter()
print(f"draft step x10: wall {w1-w0:.2f} user {u1-u0:.2f} sys {s1-s0:.2f}")
print("direct:", getattr(target.layer_source, "reader", None) and target.layer_source.reader.__dict__.get("direct"))
