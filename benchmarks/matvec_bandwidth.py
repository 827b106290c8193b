"""Matrix-vector products from DRAM on this CPU: the demo's LM head (151936x1536 bf16) by layout,
and 28 layers of int8 weight-only products (separate vs q/k/v and gate/up fused), in GB/s of weights.

    .venv/bin/python benchmarks/matvec_bandwidth.py
"""
import torch, time
torch.manual_seed(0)
def bench(f, reps=5):
    f(); t = time.perf_counter()
    for _ in range(reps): f()
    return (time.perf_counter() - t) / reps
# LM head: 151936 x 1536 bf16 (467 MB, never in cache)
W = torch.randn(151936, 1536).to(torch.bfloat16)
x1 = torch.randn(1, 1536).to(torch.bfloat16)
x2 = x1.expand(2, -1)
x8 = torch.randn(8, 1536).to(torch.bfloat16)
nb = W.nbytes
for name, f in [("F.linear 1 row", lambda: torch.nn.functional.linear(x1, W)),
                ("mm(W, x^T) 2 rows", lambda: torch.mm(W, x2.t())),
                ("mv(W, x)", lambda: torch.mv(W, x1[0])),
                ("F.linear 8 rows", lambda: torch.nn.functional.linear(x8, W)),
                ("mm(W, x^T) 8 rows", lambda: torch.mm(W, x8.t())),
                ("mm(x, W^T) 8", lambda: torch.mm(x8, W.t()))]:
    dt = bench(f)
    print(f"head {name}: {dt*1000:.1f} ms, {nb/dt/1e9:.1f} GB/s")
# int8 per-layer shapes, 28 copies so weights come from DRAM
shapes = {"q": (1536, 1536), "k": (256, 1536), "v": (256, 1536), "o": (1536, 1536), "gate": (8960, 1536), "up": (8960, 1536), "down": (1536, 8960)}
layers = []
for _ in range(28):
    layers.append({n: (torch.randint(-127, 127, s, dtype=torch.int8), torch.rand(s[0]).to(torch.bfloat16)) for n, s in shapes.items()})
fused = []
for L in layers:
    fused.append({"qkv": (torch.cat([L["q"][0], L["k"][0], L["v"][0]]), torch.cat([L["q"][1], L["k"][1], L["v"][1]])),
                  "o": L["o"], "gateup": (torch.cat([L["gate"][0], L["up"][0]]), torch.cat([L["gate"][1], L["up"][1]])), "down": L["down"]})
total = sum(w.nbytes for L in layers for w, s in L.values())
xin = {1536: torch.randn(1, 1536).to(torch.bfloat16), 8960: torch.randn(1, 8960).to(torch.bfloat16)}
for rows in (1, 4):
    xs = {k: v.expand(rows, -1).contiguous() for k, v in xin.items()}
    def sep():
        for L in layers:
            for w, s in L.values(): torch._weight_int8pack_mm(xs[w.shape[1]], w, s)
    def fus():
        for L in fused:
            for w, s in L.values(): torch._weight_int8pack_mm(xs[w.shape[1]], w, s)
    for name, f in (("separate", sep), ("fused", fus)):
        dt = bench(f, 3)
        print(f"int8 {rows} rows {name}: {dt*1000:.1f} ms per 28 layers, {total/dt/1e9:.1f} GB/s")
    # dequant alternative: bf16 weight-left on widened int8 (not cheaper, for reference)

# The same products on 1 and 2 threads
def bench(f, reps=5):
    f(); t = time.perf_counter()
    for _ in range(reps): f()
    return (time.perf_counter() - t) / reps
W = torch.randn(151936, 1536).to(torch.bfloat16); x1 = torch.randn(1, 1536).to(torch.bfloat16)
Ws = [torch.randint(-127, 127, (8960, 1536), dtype=torch.int8) for _ in range(40)]
S = torch.rand(8960).to(torch.bfloat16)
for th in (1, 2):
    torch.set_num_threads(th)
    dt = bench(lambda: torch.nn.functional.linear(x1, W)); print(f"threads {th}: head F.linear {W.nbytes/dt/1e9:.1f} GB/s")
    dt = bench(lambda: [torch._weight_int8pack_mm(x1, w, S) for w in Ws]); print(f"threads {th}: int8 1 row {sum(w.nbytes for w in Ws)/dt/1e9:.1f} GB/s")
    x4 = x1.expand(4, -1).contiguous()
    dt = bench(lambda: [torch._weight_int8pack_mm(x4, w, S) for w in Ws]); print(f"threads {th}: int8 4 rows {sum(w.nbytes for w in Ws)/dt/1e9:.1f} GB/s")

# For comparison, a plain reduction over 1 GiB (what DRAM delivers to 2 threads)
torch.set_num_threads(2)
x = torch.ones(512 * 1024 * 1024, dtype=torch.bfloat16)
dt = bench(lambda: x.sum(), 3)
print(f"sum over 1 GiB bf16: {x.nbytes / dt / 1e9:.1f} GB/s")
