#!/usr/bin/env python3
"""Golden fixtures: tiny random MiniMax-01 models and transformers' float32 logits.

Run on the GPU machine (torch + transformers 5.17; a CPU works too, just slower):

    python3 tests/reference/make_fixtures.py --out tests/fixtures/golden

For each case this builds transformers' native MiniMaxForCausalLM in float32 with random
weights, rounds every weight to bfloat16 (so the reference is computed from exactly the
values the checkpoint stores), and writes into OUT/<case>/:

  config.json            remote-code format (model_type minimax_text_01, attn_type_list, ...)
  model.safetensors      bf16 weights under MiniMax's on-disk names (per-expert w1/w2/w3)
  tokenizer.json         a byte-level BPE trained on a small text, smaller than the embedding
  tokenizer_config.json  special tokens and MiniMax-Text-01's chat template
  tokens.json            the token ids evaluated
  logits.npy             float32 [n_tokens, vocab_size]: logits at every position

RoPE: transformers 5.17's native MiniMax rotates the whole head, whatever the partial
rotary factor. MiniMax's own code (the model's definition) rotates only the first
rotary_dim dims of each head, NeoX rotate-half style, with inv_freq = theta^(-2i/rotary_dim).
This script patches transformers to that, and checks the patch changes the logits.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import MiniMaxConfig, MiniMaxForCausalLM
from transformers.models.minimax import modeling_minimax as mm

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = (ROOT / "convert/src/synth/text01_chat_template.jinja").read_text()
CORPUS = (ROOT / "convert/src/synth/corpus.txt").read_text()
SPECIAL = ["<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>"]

# Odd shapes on purpose: head_dim != hidden/heads, rotary_dim < head_dim, GQA, an arbitrary
# layer pattern, tokenizer smaller than the embedding, 600 tokens > two 256-token blocks.
CASES = {
    # llama.cpp can express this one (equal alphas, betas 1): the llama.cpp acceptance test uses it.
    "equal-alpha": dict(hidden=64, heads=4, kv_heads=2, head_dim=32, rotary=16, ffn=96, experts=4, top_k=2,
                        vocab=384, attn_types=[0, 0, 1, 0], alpha=(1.7, 1.7, 1.7), beta=(1.0, 1.0, 1.0),
                        theta=10000.0, n_tokens=600, seed=1),
    "distinct-alpha": dict(hidden=48, heads=3, kv_heads=1, head_dim=24, rotary=8, ffn=64, experts=5, top_k=2,
                           vocab=320, attn_types=[1, 0, 0, 1, 0], alpha=(2.0, 1.5, 1.25), beta=(0.5, 1.0, 0.75),
                           theta=1e7, n_tokens=600, seed=2),
}


def partial_rope(rotary_dim):
    """apply_rotary_pos_emb rotating only dims [0, rotary_dim) (NeoX pairs (i, i + rotary_dim/2))."""
    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rot(x):
            xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
            return torch.cat((xr * cos + mm.rotate_half(xr) * sin, xp), dim=-1)
        return rot(q), rot(k)
    return apply


def build(case):
    c = CASES[case]
    layer_types = ["linear_attention" if t == 0 else "full_attention" for t in c["attn_types"]]
    cfg = MiniMaxConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"],
        num_hidden_layers=len(layer_types), num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        head_dim=c["head_dim"], hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
        num_experts_per_tok=c["top_k"], num_local_experts=c["experts"], layer_types=layer_types, block_size=256,
        full_attn_alpha_factor=c["alpha"][0], full_attn_beta_factor=c["beta"][0],
        linear_attn_alpha_factor=c["alpha"][1], linear_attn_beta_factor=c["beta"][1],
        mlp_alpha_factor=c["alpha"][2], mlp_beta_factor=c["beta"][2],
        rope_parameters={"rope_type": "default", "rope_theta": c["theta"],
                         "partial_rotary_factor": c["rotary"] / c["head_dim"]},
        tie_word_embeddings=False, attn_implementation="eager", torch_dtype="float32")
    torch.manual_seed(c["seed"])
    model = MiniMaxForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # norm weights away from 1
            else:
                p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))  # the stored values, exactly
    return c, cfg, model


def set_rope(model, c, partial):
    d = c["rotary"] if partial else c["head_dim"]
    inv = 1.0 / (c["theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    model.model.rotary_emb.inv_freq = inv
    model.model.rotary_emb.original_inv_freq = inv
    mm.apply_rotary_pos_emb = partial_rope(c["rotary"]) if partial else ORIGINAL_APPLY


ORIGINAL_APPLY = mm.apply_rotary_pos_emb


def remote_state_dict(model, c):
    """Native parameter names -> MiniMax's on-disk names, bf16."""
    out = {}
    e, h = c["experts"], c["ffn"]
    for name, p in model.state_dict().items():
        if name.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay", "inv_freq")):
            continue
        p = p.to(torch.bfloat16).contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("mlp.experts.gate_up_proj")]
            for x in range(e):
                out[f"{pre}block_sparse_moe.experts.{x}.w1.weight"] = p[x, :h].clone()
                out[f"{pre}block_sparse_moe.experts.{x}.w3.weight"] = p[x, h:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("mlp.experts.down_proj")]
            for x in range(e):
                out[f"{pre}block_sparse_moe.experts.{x}.w2.weight"] = p[x].clone()
        elif name.endswith("mlp.gate.weight"):
            out[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = p
        else:
            out[name] = p
    return out


def remote_config(c, cfg):
    return {
        "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "minimax_text_01",
        "attn_type_list": c["attn_types"], "hidden_size": c["hidden"], "num_hidden_layers": len(c["attn_types"]),
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": c["head_dim"],
        "rotary_dim": c["rotary"], "rope_theta": c["theta"], "intermediate_size": c["ffn"],
        "num_local_experts": c["experts"], "num_experts_per_tok": c["top_k"], "vocab_size": c["vocab"],
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "postnorm": True,
        "layernorm_full_attention_alpha": c["alpha"][0], "layernorm_full_attention_beta": c["beta"][0],
        "layernorm_linear_attention_alpha": c["alpha"][1], "layernorm_linear_attention_beta": c["beta"][1],
        "layernorm_mlp_alpha": c["alpha"][2], "layernorm_mlp_beta": c["beta"][2],
        "shared_intermediate_size": 0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def tokenizer(vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def write_case(case, out_root):
    from safetensors.torch import save_file
    c, cfg, model = build(case)
    out = out_root / case
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(c["vocab"] - 64)  # rows past the tokenizer stay in the embedding, as in MiniMax
    tok.save(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() < c["vocab"]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[2], "chat_template": CHAT_TEMPLATE},
        indent=2))
    ids = tok.encode(CORPUS).ids
    assert len(ids) >= c["n_tokens"], f"corpus gives only {len(ids)} tokens"
    tokens = ids[: c["n_tokens"]]
    (out / "tokens.json").write_text(json.dumps(tokens))
    x = torch.tensor([tokens])
    with torch.no_grad():
        set_rope(model, c, partial=False)
        full = model(input_ids=x).logits[0].float()
        set_rope(model, c, partial=True)
        logits = model(input_ids=x).logits[0].float()
    changed = (full - logits).abs().max().item()
    assert changed > 1e-3, f"the partial-RoPE patch did not change the logits ({changed})"
    np.save(out / "logits.npy", logits.numpy().astype(np.float32))
    save_file(remote_state_dict(model, c), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(remote_config(c, cfg), indent=2))
    print(f"{case}: {len(tokens)} tokens, vocab {c['vocab']} (tokenizer {tok.get_vocab_size()}), "
          f"layers {c['attn_types']}, logits std {logits.std().item():.3f}, "
          f"full-head RoPE would change them by up to {changed:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/golden")
    args = ap.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    for case in CASES:
        write_case(case, args.out)


if __name__ == "__main__":
    main()
