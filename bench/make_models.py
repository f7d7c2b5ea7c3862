"""Build the tiny, random, offline models shared by both sides of the PPO speed benchmark.

Writes into --out (default bench/_models):
  tokenizer/    byte-level BPE (vocab 1024) trained here on synthetic text; <|endoftext|> = bos/eos, [PAD] = pad
  policy/       random GPT2LMHeadModel (4 layers, 4 heads, 128 wide, 256 positions, dropout 0)
  reward/       random GPT2ForSequenceClassification (same shape, num_labels=1, pad_token_id set)
  prompts.jsonl 64*N prompts of exactly --prompt-len tokens: {"text": ..., "input_ids": [...]}

Deterministic: the same --seed gives the same weights, vocabulary and prompts. Weights are drawn by this
script from a seeded torch.Generator (not by transformers' own init), so transformers 4.48 (TRL venv)
and 5.x (main venv) write identical weights, tokenizer and prompts; only the models' config JSON differ
(version stamp and the keys each transformers version writes). Files from either venv load in both.
Runs offline: nothing is downloaded.
"""

import argparse
import json
import math
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "[PAD]"
VOCAB = 1024


def make_words(rng, n=600):
    """Pseudo-words made of syllables: a fixed, seeded lexicon."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ck"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.randint(1, 3))))
    words = sorted(words)
    rng.shuffle(words)  # frequency rank independent of spelling
    return words


def sentence(rng, words, n_words):
    """Zipf-ish word choice so BPE learns frequent words whole and splits rare ones."""
    idx = [min(int(2 * rng.paretovariate(0.8)) - 2, len(words) - 1) for _ in range(n_words)]
    return " ".join(words[i] for i in idx).capitalize() + "."


def train_tokenizer(rng, words):
    corpus = [sentence(rng, words, rng.randint(5, 30)) for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def save_tokenizer(tok, path):
    """Written by hand rather than by save_pretrained: transformers 5 would record a tokenizer class
    ("TokenizersBackend") that transformers 4.48 cannot load; this minimal config loads in both."""
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": PAD,
           "padding_side": "left", "model_max_length": 256, "clean_up_tokenization_spaces": False}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return PreTrainedTokenizerFast.from_pretrained(path)


def seeded_init_(model, seed):
    """GPT-2 style init from our own generator: N(0, 0.02) matrices, residual projections scaled by
    1/sqrt(2*n_layer), zero biases, unit LayerNorm gains. Parameters visited in sorted-name order."""
    g = torch.Generator().manual_seed(seed)
    n_layer = model.config.n_layer
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                p.zero_()
            elif ".ln_" in name:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "_models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-batches", type=int, default=8, help="number of prompts = 64 * n_batches")
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--verify", action="store_true", help="only load --out with Auto* classes and print a fingerprint")
    args = ap.parse_args()
    if args.verify:
        return verify(args.out)

    rng = random.Random(args.seed)
    words = make_words(rng)
    tok = save_tokenizer(train_tokenizer(rng, words), os.path.join(args.out, "tokenizer"))
    assert len(tok) == VOCAB and tok.pad_token_id != tok.eos_token_id, (len(tok), tok.pad_token_id)

    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=len(tok),
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    policy = GPT2LMHeadModel(cfg)
    seeded_init_(policy, args.seed + 1)
    policy.save_pretrained(os.path.join(args.out, "policy"))

    cfg.num_labels = 1
    reward = GPT2ForSequenceClassification(cfg)
    seeded_init_(reward, args.seed + 2)
    reward.save_pretrained(os.path.join(args.out, "reward"))

    with open(os.path.join(args.out, "prompts.jsonl"), "w") as f:
        for _ in range(64 * args.n_batches):
            ids = []
            while len(ids) < args.prompt_len:  # sentences until long enough, then cut to the exact length
                ids += tok(" " + sentence(rng, words, rng.randint(5, 30)) if ids else
                           sentence(rng, words, rng.randint(5, 30)))["input_ids"]
            ids = ids[: args.prompt_len]
            assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
            f.write(json.dumps({"text": tok.decode(ids), "input_ids": ids}) + "\n")
    print(f"wrote {args.out}: vocab {len(tok)}, policy {sum(p.numel() for p in policy.parameters())} params, "
          f"reward {sum(p.numel() for p in reward.parameters())} params, {64 * args.n_batches} prompts")


def verify(out):
    """Load what main() wrote through the Auto* classes and print a fingerprint to compare across venvs."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(out, "policy")).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "reward")).eval()
    with open(os.path.join(out, "prompts.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(tok(r["text"])["input_ids"] == r["input_ids"] for r in rows), "tokenizer does not round-trip prompts"
    ids = torch.tensor([r["input_ids"] for r in rows[:4]])
    with torch.no_grad():
        lm, rm = policy(ids).logits, reward(ids).logits
    print(json.dumps({"transformers": transformers.__version__, "tokenizer": type(tok).__name__, "vocab": len(tok),
                      "eos": tok.eos_token_id, "pad": tok.pad_token_id, "reward_pad": reward.config.pad_token_id,
                      "policy_logit_sum": round(lm.double().sum().item(), 4), "reward": rm.flatten().tolist()}))


if __name__ == "__main__":
    main()
