"""One self-draft step at widths 1 and 8 after a 300-token prefix, then torch.profiler's
table of a width-1 step (where its milliseconds go).

    .venv/bin/python benchmarks/draft_step_profile.py [self:int8|self:int4] [--float32-kernels] [--target-head|--both-heads]

``--float32-kernels``: where the target computes in float32, hand the low-bit kernels float32
rows and scales (as specchat did before session 27) instead of bf16 ones.  ``--target-head``:
compute the logits with the target's own head where the draft keeps an int8 copy of it
(specchat.model.drafthead).  ``--both-heads``: time the steps with the draft's head and with the
target's, alternating, at widths 1, 2, 4 and 8.
"""
import sys, time, torch
from specchat import RunConfig
from specchat.app.loader import load_pipeline
from specchat.model.lm import causal_visibility
config = RunConfig(model="demo", draft=sys.argv[1] if len(sys.argv) > 1 else "self:int8", offload="ssd", budget=16, ram_budget=770_000_000)
p = load_pipeline(config, print, calibrate=False)
draft = p.engine.draft
slow = "--float32-kernels" in sys.argv[2:]
if "--target-head" in sys.argv[2:]:
    draft = p.engine.target.with_layers(draft.layer_source, draft.layer_dtype, draft.kv_source is not None)
    print("the target's own head")
reps = 3 if slow else 10  # steps timed per width (seconds each with float32 kernels)
ids = list(range(100, 400)); P = len(ids)
dcache = draft.new_cache()
draft.forward(torch.tensor(ids), torch.arange(P), causal_visibility(0, P), dcache, logit_rows=torch.tensor([P - 1]))
if slow:
    from specchat.weights.lowbit import Int4Linear, Int8Linear
    for m in draft.layer_source.layers():
        for linear in m.modules():
            if isinstance(linear, (Int4Linear, Int8Linear)):
                linear.kernel_dtype = torch.float32
                for name in ("scales", "scales_zeros"):
                    if hasattr(linear, name):
                        setattr(linear, name, getattr(linear, name).float())
    print("low-bit kernels over float32 rows and scales")
def step(w):
    L = dcache.length
    draft.forward(torch.randint(0, 1000, (w,)), torch.arange(L, L + w), causal_visibility(L, w), dcache)
    dcache.crop(L)
if "--both-heads" in sys.argv[2:]:
    heads = {"the draft's head": draft, "the target's head": p.engine.target.with_layers(draft.layer_source, draft.layer_dtype, draft.kv_source is not None)}
    for w in (1, 2, 4, 8):
        spent = dict.fromkeys(heads, 0.0)
        for _ in range(3):
            for name, model in heads.items():
                draft = model
                step(w)
                t = time.perf_counter()
                for _ in range(reps): step(w)
                spent[name] += time.perf_counter() - t
        print(f"width {w}: " + ", ".join(f"{name} {s / reps / 3 * 1000:.1f} ms/step" for name, s in spent.items()), flush=True)
    draft = heads["the draft's head"]
for w in (1, 8):
    for _ in range(1 if slow else 3): step(w)
    t = time.perf_counter()
    for _ in range(reps): step(w)
    print(f"width {w}: {(time.perf_counter()-t)/reps*1000:.1f} ms/step", flush=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(reps): step(1)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
