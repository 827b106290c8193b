"""One self-draft step at widths 1 and 8 after a 300-token prefix, then torch.profiler's
table of a width-1 step (where its milliseconds go).

    .venv/bin/python benchmarks/draft_step_profile.py [self:int8|self:int4]
"""
import sys, time, torch
from specchat import RunConfig
from specchat.app.loader import load_pipeline
from specchat.model.lm import causal_visibility
config = RunConfig(model="demo", draft=sys.argv[1] if len(sys.argv) > 1 else "self:int8", offload="ssd", budget=16, ram_budget=770_000_000)
p = load_pipeline(config, print, calibrate=False)
draft = p.engine.draft
ids = list(range(100, 400)); P = len(ids)
dcache = draft.new_cache()
draft.forward(torch.tensor(ids), torch.arange(P), causal_visibility(0, P), dcache, logit_rows=torch.tensor([P - 1]))
def step(w):
    L = dcache.length
    draft.forward(torch.randint(0, 1000, (w,)), torch.arange(L, L + w), causal_visibility(L, w), dcache)
    dcache.crop(L)
for w in (1, 8):
    for _ in range(3): step(w)
    t = time.perf_counter()
    for _ in range(10): step(w)
    print(f"width {w}: {(time.perf_counter()-t)/10*1000:.1f} ms/step")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10): step(1)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
