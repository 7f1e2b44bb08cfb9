#!/usr/bin/env python3
"""Train mxr's bundled nano MiniMax-01 on Open Shakespeare (run on the GPU machine).

    python3 tests/reference/train_nano.py --data DIR --out nano/checkpoint [--minutes 5]

DIR holds train.00.txt, train.01.txt and val.txt (shared/data/open_shakespeare). The model is
transformers' native MiniMaxForCausalLM with the real architecture's pattern at toy size:
8 layers (7 lightning + 1 softmax), 8 experts top-2, head_dim 32 with rotary_dim 16 (RoPE
patched to partial NeoX as MiniMax defines it, see make_fixtures.py), equal residual alphas
(2 * layers)^0.25 with betas 1, lightning-norm epsilon 1e-6. Hidden size and expert width
256, so every matrix row is a whole number of Q4_K/Q6_K blocks. About 17 M parameters.

Steps: train a byte-level BPE (vocabulary 4096, MiniMax's special tokens), tokenize, train
with AdamW (+ the router load-balancing loss) for a fixed time, evaluate every few hundred
steps, keep the weights with the best validation loss, round them to bfloat16, and write
MiniMax's on-disk format (remote-code config.json, per-expert names, bf16 safetensors in
shards under 12 MB, tokenizer.json, tokenizer_config.json with the Text-01 chat template) and
train_log.json. The validation loss printed last is that of the saved bf16 weights over
non-overlapping windows of --ctx tokens (each window predicts its tokens 1..ctx-1), exactly
what `mxr ppl --ctx` computes.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MiniMaxConfig, MiniMaxForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (partial RoPE patch, remote names, chat template)

DEVICE = torch.device("cpu")
SPECIAL = ["<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>"]
SIZE = dict(hidden=256, heads=8, kv_heads=2, head_dim=32, rotary=16, ffn=256, experts=8, top_k=2,
            vocab=4096, attn_types=[0, 0, 0, 0, 0, 0, 0, 1], theta=10000.0)


def train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def build(c):
    alpha = (2.0 * len(c["attn_types"])) ** 0.25
    c = dict(c, alpha=(alpha, alpha, alpha), beta=(1.0, 1.0, 1.0))
    layer_types = ["linear_attention" if t == 0 else "full_attention" for t in c["attn_types"]]
    cfg = MiniMaxConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"], num_hidden_layers=len(layer_types),
        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=1e-5, num_experts_per_tok=c["top_k"], num_local_experts=c["experts"],
        layer_types=layer_types, block_size=256, full_attn_alpha_factor=alpha, full_attn_beta_factor=1.0,
        linear_attn_alpha_factor=alpha, linear_attn_beta_factor=1.0, mlp_alpha_factor=alpha, mlp_beta_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": c["theta"], "partial_rotary_factor": c["rotary"] / c["head_dim"]},
        tie_word_embeddings=False, attn_implementation="eager", output_router_logits=True, router_aux_loss_coef=0.01,
        initializer_range=0.02)
    return c, cfg


def windows(ids, ctx):
    n = len(ids) // ctx
    return torch.tensor(ids[: n * ctx]).view(n, ctx)


@torch.no_grad()
def evaluate(model, val, batch):
    """Mean NLL of tokens 1..ctx-1 of every window, and the count of predictions."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch):
        x = val[i : i + batch].to(DEVICE)
        logits = model(input_ids=x).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count, count


def save_shards(state, out, max_bytes=12 << 20):
    from safetensors.torch import save_file
    groups, cur, size = [], {}, 0
    for k, v in state.items():
        b = v.numel() * v.element_size()
        if cur and size + b > max_bytes:
            groups.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + b
    groups.append(cur)
    weight_map = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in g})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-chars", type=int, default=0, help="truncate the corpus (smoke tests)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    train_text = "\n\n\n".join((args.data / f).read_text() for f in ["train.00.txt", "train.01.txt"])
    val_text = (args.data / "val.txt").read_text()
    if args.max_chars:
        train_text, val_text = train_text[: args.max_chars], val_text[: args.max_chars // 4]
    tok = train_tokenizer([train_text], SIZE["vocab"])
    train_ids, val_ids = tok.encode(train_text).ids, tok.encode(val_text).ids
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train_ids)} tokens, val {len(val_ids)} tokens", flush=True)
    c, cfg = build(SIZE)
    model = MiniMaxForCausalLM(cfg).to(DEVICE).float()
    mf.set_rope(model, c, partial=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    train = torch.tensor(train_ids)
    val = windows(val_ids, args.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    start, step, best, log = time.time(), 0, (float("inf"), None, 0), []
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train) - args.ctx - 1, (args.batch,))
        x = torch.stack([train[i : i + args.ctx] for i in idx]).to(DEVICE)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or time.time() - start >= budget:
            vl, _ = evaluate(model, val, 64)
            log.append({"step": step, "seconds": round(time.time() - start, 1), "train_loss": out.loss.item(), "val_loss": vl})
            print(f"step {step}: train loss {out.loss.item():.4f}, val loss {vl:.4f} (ppl {math.exp(vl):.2f}), lr {lr:.2e}", flush=True)
            if vl < best[0]:
                best = (vl, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
    model.load_state_dict(best[1])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # what the checkpoint stores
    vl, count = evaluate(model, val, 64)
    print(f"best step {best[2]}; saved bf16 weights: val loss {vl:.6f} (ppl {math.exp(vl):.4f}) over {len(val)} windows of {args.ctx} ({count} predictions)", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[2], "chat_template": mf.CHAT_TEMPLATE}, indent=2))
    save_shards(mf.remote_state_dict(model.cpu(), c), out)
    (out / "config.json").write_text(json.dumps(mf.remote_config(c, cfg), indent=2))
    (out / "train_log.json").write_text(json.dumps({"parameters": n_params, "ctx": args.ctx, "val_windows": len(val),
        "val_predictions": count, "val_loss_bf16": vl, "val_ppl_bf16": math.exp(vl), "best_step": best[2], "log": log,
        "size": SIZE, "seed": args.seed, "minutes": args.minutes}, indent=1))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
