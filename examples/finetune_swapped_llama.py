"""Upcycle a tiny Llama into an MoE with moebal and fine-tune it on the embedded corpus.

    python examples/finetune_swapped_llama.py                  # about 20 s on one CPU core
    python examples/finetune_swapped_llama.py --steps 200 --router aux_loss

1. Build a tiny byte-level Llama (vocabulary 256) with random weights and train it dense
   for ``--dense-steps`` steps on the Python standard library's sources (no downloads).
2. ``moebal.swap_ffn`` replaces every MLP with an MoE whose experts are copies of it
   (sparse upcycling); the script checks that the logits did not change.
3. Fine-tune for ``--steps`` steps: task loss + ``moebal.aux_loss(model)``, loss-free bias
   updates after each ``optimizer.step()`` through ``moebal.register_bias_update_hook``,
   and ``moebal.balance_report(model)`` logged as it would go to TensorBoard/W&B.
4. Save the state_dict, rebuild the model from scratch, load it and check it is identical.
"""
from __future__ import annotations

import argparse
import io
import sysconfig
import time
from pathlib import Path

import torch

import moebal
from moebal import LossFree, Router


def byte_stream() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 streams of standard-library source bytes."""
    try:
        from moebal.compare.corpus import load_corpus
    except ImportError:  # the corpus module is optional here: read the files directly
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py"))
        data = b"\0".join(p.read_bytes() for p in files)
        stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        cut = int(0.9 * stream.numel())
        return stream[:cut], stream[cut:]
    corpus = load_corpus()
    return corpus.train, corpus.val


def batches(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
        chunk = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).long()
        yield chunk[:, :-1], chunk[:, 1:]


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg)


def make_router(num_experts: int, top_k: int, policy: str, rate: float):
    if policy == "loss_free":  # biases move once per optimizer step, through the hook
        return lambda: Router(128, num_experts, top_k, score="sigmoid", balancer=LossFree(rate=rate, update="manual"))
    return policy


@torch.no_grad()
def val_loss(model, stream, batch, seq_len, n=4):
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = batches(stream, batch, seq_len, gen)
    losses = [float(model(inp, labels=inp).loss) for inp, _ in (next(it) for _ in range(n))]
    model.train()
    return sum(losses) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="loss_free", choices=["loss_free", "aux_loss", "base"])
    p.add_argument("--bias-rate", type=float, default=1e-2,
                   help="loss-free bias step (DeepSeek-V3 uses 1e-3 over far longer runs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the model is tiny, so more threads mostly add synchronisation")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    train, val = byte_stream()
    print(f"corpus: {train.numel():,} train bytes, {val.numel():,} validation bytes")
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train, args.batch, args.seq_len, gen)

    # 1. a dense starting point (HF shifts labels inside the model: labels = inputs)
    model = tiny_llama(args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for _ in range(args.dense_steps):
        inp, _ = next(data)
        model(inp, labels=inp).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dense_val = val_loss(model, val, args.batch, args.seq_len)
    print(f"dense: {args.dense_steps} steps in {time.perf_counter() - t0:.1f}s, val loss {dense_val:.4f}")

    # 2. upcycle: every expert a copy of the MLP, fresh routers, renormalised top-k weights
    probe = next(data)[0][:2]
    model.eval()
    with torch.no_grad():
        before = model(probe).logits
    router = make_router(args.experts, args.top_k, args.router, args.bias_rate)
    report = moebal.swap_ffn(model, args.experts, args.top_k, router=router)
    print(report)
    with torch.no_grad():
        drift = (model(probe).logits - before).abs().max().item()
    print(f"max |logits after swap - before| = {drift:.2e} (fp32 rounding of the top-k weights' sum)")
    model.train()

    # 3. fine-tune the MoE model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    hook = moebal.register_bias_update_hook(opt, model) if args.router == "loss_free" else None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        inp, _ = next(data)
        lm_loss = model(inp, labels=inp).loss
        aux = moebal.aux_loss(model)
        (lm_loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            rep = moebal.balance_report(model)  # what you would pass to wandb.log / add_scalars
            layers = " ".join(f"L{i}={rep[f'moe/layer{i}/max_violation']:.2f}" for i in range(len(report)))
            print(f"step {step:4d}  loss {lm_loss.item():.4f}  aux {aux.item():.4f}  MaxVio {layers}")
    moe_val = val_loss(model, val, args.batch, args.seq_len)
    elapsed = time.perf_counter() - t0
    print(f"moe: {args.steps} steps in {elapsed:.1f}s, val loss {moe_val:.4f} (dense was {dense_val:.4f})")
    if hook is not None:
        hook.remove()

    # 4. save, rebuild, load: bit-exact, loss-free biases included
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    rebuilt = tiny_llama(args.seed + 1)
    moebal.swap_ffn(rebuilt, args.experts, args.top_k, router=router, upcycle=False)
    buf.seek(0)
    rebuilt.load_state_dict(torch.load(buf), strict=True)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    print(f"state_dict round trip bit-exact: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
