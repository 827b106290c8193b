"""Streaming a target's layers to a GPU: achieved rate vs. pinned host->device bandwidth, pass time vs. tree size.

A random-init Llama of 8B shape (32 layers, hidden 4096, MLP 14336, 8 KV heads,
vocab 128256) is written as a safetensors directory, turned into 16-bit and NF4
layer stores by specchat's own ``build_store``, and run through
``specchat.model.stream.device`` -- the code ``specchat run --offload ram|ssd`` uses on a GPU:

  ram  every layer waits in pinned host RAM and is copied to the GPU each pass;
  ssd  every layer is read from the store (direct I/O) into pinned staging buffers first.

Reported per store and mode: bytes copied per pass, pass time for tree sizes
(default 1, 16, 64, 256, 1024 tokens), the achieved streaming rate of the
1-token pass (bytes / seconds) and its ratio to the measured pinned H2D
bandwidth (goal >= 0.8).  ``--check`` first compares streamed and resident
logits on a small model on the same device (they must agree).

  PYTHONPATH=. python benchmarks/gpu_stream.py --check --stores bfloat16 --work /tmp/gpu-bench  # on the GPU
  PYTHONPATH=. python benchmarks/gpu_stream.py --stores nf4 --work /tmp/gpu-bench     # (needs bitsandbytes)
  PYTHONPATH=. python benchmarks/gpu_stream.py --shape tiny --device cpu --check      # a smoke run anywhere

For the 8B shape each store is a separate call (each stage takes minutes; a command
may run 10): the work directory is reused, so the model is written only once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from specchat.model.lm import LayeredLM, causal_visibility
from specchat.model.stream.build import load_streamed
from specchat.weights.quant4 import quantizable, roundtrip_nf4
from specchat.weights.store import build_store

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def write_random_llama(path: Path, shape: str, seed: int = 0) -> Path:
    """A safetensors Llama directory with random bf16 weights, one shard per layer, each written
    as soon as it is generated (at most one layer -- or the embeddings and head -- in RAM)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16", tie_word_embeddings=False)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    index: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    shard = None

    def flush() -> None:  # one shard per layer, written as soon as it is complete
        if pending:
            file = f"model-{len(set(index.values())):03d}-{shard}.safetensors"
            save_file(pending, str(path / file), metadata={"format": "pt"})
            index.update({name: file for name in pending})
            pending.clear()

    for name, param in skeleton.state_dict().items():
        this = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        if this != shard:
            flush()
            shard = this
        if name.endswith("norm.weight"):
            pending[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            pending[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(path)
    return path


def pinned_h2d_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from specchat.app.hardware import pinned_bandwidth

    return pinned_bandwidth(device.index or 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pass_seconds(lm: LayeredLM, tokens: int, device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` passes over ``tokens`` new tokens (causal, empty cache); logits come back to the host."""
    ids = torch.randint(0, lm.vocab_size, (tokens,))
    visible = causal_visibility(0, tokens)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up (and checks each layer file's CRC)
        sync(device)
        start = time.perf_counter()
        lm.forward(ids, torch.arange(tokens), visible, lm.new_cache(), logit_rows=torch.tensor([tokens - 1]))
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def check_equivalence(work: Path, device: torch.device, copy_to_device: bool) -> str:
    """Streamed (ram and ssd) logits == resident logits for a small random Llama on ``device``."""
    from transformers import AutoModelForCausalLM

    model_dir = write_random_llama(work / "check-model", "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    lines = []
    for store_dtype in ("bfloat16", "nf4"):
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        if store_dtype == "nf4":  # the resident reference holds the weights as the 4-bit store gives them back
            with torch.no_grad():
                for name, param in hf_model.model.layers.named_parameters():
                    if quantizable(name.split(".", 1)[1], tuple(param.shape)):
                        param.copy_(roundtrip_nf4(param.float()).to(dtype))
        resident = LayeredLM(hf_model.to(device).eval())  # (no tokenizer needed: random weights)
        reference = resident.forward(ids, torch.arange(8), causal_visibility(0, 8), resident.new_cache())
        store = build_store(model_dir, work / f"check-store-{store_dtype}", store_dtype, dense_dtype="bfloat16")
        for mode, host in (("ram", store.num_layers), ("ssd", 0)):
            lm = load_streamed(store, dtype, device=device, host_layers=host, copy_to_device=copy_to_device)
            logits = lm.forward(ids, torch.arange(8), causal_visibility(0, 8), lm.new_cache())
            error = float((logits - reference).abs().max())
            ok = error < 0.1 and torch.equal(logits.argmax(-1), reference.argmax(-1))
            lines.append(f"check {store_dtype} {mode}: max |streamed - resident| = {error:.2e} {'ok' if ok else 'FAILED'}")
            if not ok:
                raise SystemExit("\n".join(lines))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--stores", default="bfloat16,nf4", help="comma-separated: bfloat16, nf4")
    parser.add_argument("--modes", default="ram,ssd", help="comma-separated: ram (pinned RAM), ssd (store)")
    parser.add_argument("--sizes", default="1,16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=Path("/tmp/specchat-gpu-bench"))
    parser.add_argument("--check", action="store_true", help="first check streamed == resident on a small model")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    copy_to_device = True  # the host -> device ring, also when smoke-testing on a CPU
    if args.check:
        print(check_equivalence(args.work, device, copy_to_device), flush=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model_dir = write_random_llama(args.work / f"llama-{args.shape}", args.shape)
    print(f"random Llama {args.shape}: {model_dir} ({time.perf_counter() - started:.0f}s)", flush=True)
    h2d = pinned_h2d_bandwidth(device)
    print(f"pinned host->device bandwidth: {h2d / 1e9:.1f} GB/s" if h2d else "pinned host->device bandwidth: n/a (no GPU)")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for store_dtype in args.stores.split(","):
        started = time.perf_counter()
        store = build_store(model_dir, args.work / f"store-{args.shape}-{store_dtype}", store_dtype, dense_dtype="bfloat16")
        print(f"store {store_dtype}: {store.num_layers} x {store.layer_bytes / 1e6:.0f} MB ({time.perf_counter() - started:.0f}s)", flush=True)
        for mode in args.modes.split(","):
            host = store.num_layers if mode == "ram" else 0
            lm = load_streamed(store, dtype, device=device, host_layers=host, copy_to_device=copy_to_device)
            moved = store.num_layers * store.layer_bytes
            for tokens in sizes:
                read_before = lm.bytes_read()
                seconds = pass_seconds(lm, tokens, device, args.repeats)
                row = {
                    "store": store_dtype, "mode": mode, "tokens": tokens, "pass_s": seconds, "bytes_per_pass": moved,
                    "store_bytes_read_per_pass": (lm.bytes_read() - read_before) // (args.repeats + 1),
                    "rate_gbps": moved / seconds / 1e9, "of_h2d": moved / seconds / h2d if h2d else None,
                }
                rows.append(row)
                of = f"{row['of_h2d']:.2f} of pinned H2D" if h2d else ""
                print(f"{store_dtype:9s} {mode:4s} {tokens:5d} tokens: {seconds * 1e3:8.1f} ms/pass, "
                      f"{row['rate_gbps']:6.2f} GB/s {of}", flush=True)
            del lm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    (args.work / f"gpu_stream_{args.shape}.json").write_text(json.dumps({"h2d_bytes_per_s": h2d, "rows": rows}, indent=1))
    print(f"results: {args.work / f'gpu_stream_{args.shape}.json'}")


if __name__ == "__main__":
    main()
