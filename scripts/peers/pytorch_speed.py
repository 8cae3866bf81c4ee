#!/usr/bin/env python3
"""PyTorch + PEFT on the workloads of `cargo bench -p device-agent --bench speed`, for the
side-by-side tables in BENCHMARKS.md.

Same model (the cached SmolLM2-135M-Instruct GGUF, dequantized by transformers' GGUF loader),
same shapes, same thread count, medians after one warm-up:

  - fp32 matmul 2048 x 2048 x 2048 (GFLOP/s)
  - LoRA r16 (alpha 32, all seven projections) training step, batch 4 x 256 tokens, AdamW,
    fp32: dense, and with 50% of the MLP channels and 1/3 of the query heads removed (the
    bench's pruned shapes: the first half of every block's channels, query heads 0,1,3,4,6,7)
  - prompt forward, 256 tokens, batch 1, full logits, dense and pruned
  - greedy generation of 64 tokens after the chat prompt the bench uses
  - peak RSS of the process after the dense step (`--memory-only` measures that alone)

Usage (in a virtual environment with torch, transformers, peft, gguf):
  python scripts/peers/pytorch_speed.py [--threads 2] [--reps 3] [--model PATH.gguf]
  python scripts/peers/pytorch_speed.py --bf16 [--reps 3]   # LoRA steps only: fp32 and bf16
                                                           # autocast, alternating in pairs
The model defaults to `$FEDSPINE_CACHE` (or ~/.cache/fedspine) as `device-agent fetch` left it.
"""

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path


def cached_model() -> Path:
    root = Path(os.environ.get("FEDSPINE_CACHE", Path.home() / ".cache" / "fedspine"))
    found = sorted(root.glob("smollm2-135m-instruct/**/*.gguf"))
    if not found:
        raise SystemExit(
            f"no SmolLM2 GGUF under {root}: run `cargo run --release -p device-agent -- fetch` first"
        )
    return found[0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median_time(reps, fn):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype="float32", **kw)
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model.eval()
    return model, tok


def pruned_copy(model):
    """The bench's pruned shapes: the first half of every block's MLP channels and query heads
    0,1,3,4,6,7 (two of each KV group's three), with the real weights sliced."""
    import copy

    import torch

    cfg = copy.deepcopy(model.config)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    keep_heads = [0, 1, 3, 4, 6, 7]
    ffn = cfg.intermediate_size // 2
    cfg.head_dim = head_dim
    cfg.num_attention_heads = len(keep_heads)
    cfg.intermediate_size = ffn
    from transformers import LlamaForCausalLM

    small = LlamaForCausalLM(cfg).to(torch.float32)
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep_heads])
    with torch.no_grad():
        small.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        small.model.norm.weight.copy_(model.model.norm.weight)
        for src, dst in zip(model.model.layers, small.model.layers):
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
            a, b = src.self_attn, dst.self_attn
            b.q_proj.weight.copy_(a.q_proj.weight[rows])
            b.k_proj.weight.copy_(a.k_proj.weight)
            b.v_proj.weight.copy_(a.v_proj.weight)
            b.o_proj.weight.copy_(a.o_proj.weight[:, rows])
            m, n = src.mlp, dst.mlp
            n.gate_proj.weight.copy_(m.gate_proj.weight[:ffn])
            n.up_proj.weight.copy_(m.up_proj.weight[:ffn])
            n.down_proj.weight.copy_(m.down_proj.weight[:, :ffn])
    small.tie_weights()
    small.eval()
    return small


def lora_step_time(model, ids, reps, bf16=False):
    """Median seconds of one LoRA step; `bf16` runs the forward and the loss under CPU bf16
    autocast (the frozen products in bf16, as the issue's 438 tok/s peer figure)."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    x = ids[:, :-1].contiguous()
    y = ids[:, 1:].contiguous()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = peft_model(input_ids=x)
            loss = torch.nn.functional.cross_entropy(
                out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1)
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    s = median_time(reps, step)
    peft_model.unload()
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--memory-only", action="store_true", help="only the dense step, for its peak RSS")
    ap.add_argument("--bf16", action="store_true", help="only the LoRA steps, fp32 and bf16 autocast alternating")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.model or cached_model()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"reps {args.reps} (medians); CPU capability {torch.backends.cpu.get_cpu_capability()}")
    model, tok = load(path)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 257), generator=gen)

    if args.memory_only:
        s = lora_step_time(model, ids, 1)
        print(f"| LoRA r16 step, b4 x s256, fp32, dense | {1024 / s:.0f} tok/s ({s:.2f} s/step) | peak RSS {peak_rss_mib():.0f} MiB |")
        return

    if args.bf16:
        pruned = pruned_copy(model)
        print("| workload | PyTorch | unit |")
        print("|---|---|---|")
        for name, m in [("dense", model), ("pruned 50% MLP, 1/3 heads", pruned)]:
            for r in range(args.reps):
                for label, flag in [("fp32", False), ("bf16 autocast", True)]:
                    s = lora_step_time(m, ids, 1, bf16=flag)
                    print(f"| LoRA r16 step, b4 x s256, {label}, {name} (pair {r + 1}) | {1024 / s:.0f} | tok/s ({s:.2f} s/step) |")
        return

    print("| workload | PyTorch | unit |")
    print("|---|---|---|")
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    s = median_time(max(args.reps, 3), lambda: torch.mm(a, b))
    print(f"| fp32 matmul 2048 x 2048 x 2048 | {2 * 2048**3 / s / 1e9:.0f} | GFLOP/s |")

    pruned = pruned_copy(model)
    for name, m in [("dense", model), ("pruned 50% MLP, 1/3 heads", pruned)]:
        s = lora_step_time(m, ids, args.reps)
        print(f"| LoRA r16 step, b4 x s256, fp32, {name} | {1024 / s:.0f} | tok/s ({s:.2f} s/step); peak RSS so far {peak_rss_mib():.0f} MiB |")

    prompt = ids[:1, :256]
    fwd = []
    for name, m in [("dense", model), ("pruned", pruned)]:
        m.eval()
        with torch.inference_mode():
            s = median_time(max(args.reps, 3), lambda: m(input_ids=prompt, use_cache=False).logits)
        fwd.append(s)
        print(f"| prompt forward 256 tokens, b1, fp32, {name} | {256 / s:.0f} | tok/s |")
    print(f"| forward speed-up of the pruned model | {fwd[0] / fwd[1]:.2f} | x |")

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a whale."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    if not isinstance(chat, torch.Tensor):
        chat = chat["input_ids"]
    rates = []
    with torch.inference_mode():
        model.generate(chat, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        for _ in range(args.reps):
            t = time.perf_counter()
            out = model.generate(chat, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            dt = time.perf_counter() - t
            rates.append((out.shape[1] - chat.shape[1]) / dt)
    print(f"| greedy generation, 64 tokens, fp32 (prompt {chat.shape[1]} tokens, prefill included) | {statistics.median(rates):.1f} | tok/s |")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
