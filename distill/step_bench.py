"""Milliseconds per training step and per inference batch, by arithmetic and optimizer, on this machine.

`python -m distill.step_bench` times 35 training steps (after 5 warm-up steps) and 20 inference batches
of the default build's teacher (6 layers) and student (5 layers) on real length-bucketed batches of the
movie snippets, for each mode: fp32 or bf16 autocast, and AdamW's foreach or fused kernel. It is how the
build's ``precision: auto`` and fused optimizer were chosen; run it before changing either on new hardware.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer

from distill import train
from distill.build import splits_for
from distill.config import BuildConfig

MODES = ("fp32", "fp32-fused", "bf16", "bf16-fused")


def time_mode(mode: str, layers: int, texts: list[str], labels: torch.Tensor, label_names: tuple[str, ...],
              batches: list[np.ndarray], tokenizer, max_length: int) -> tuple[float, float]:
    """Median training-step and mean inference-batch seconds for one mode."""
    precision = "bf16" if mode.startswith("bf16") else "fp32"
    model = train.new_teacher(label_names, seed=0)
    if layers != model.config.num_hidden_layers:
        model = train.student_from_teacher(model, layers)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-5, fused=mode.endswith("fused") or None)
    steps = []
    for i, index in enumerate(batches):
        started = time.perf_counter()
        batch = train.encode(tokenizer, [texts[j] for j in index], max_length)
        with train.autocast(precision):
            logits = model(**batch).logits
        F.cross_entropy(logits.float(), labels[index]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if i >= 5:
            steps.append(time.perf_counter() - started)
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode(), train.autocast(precision):
        for index in batches[:20]:
            model(**train.encode(tokenizer, [texts[j] for j in index], max_length))
    return float(np.median(steps)), (time.perf_counter() - started) / 20


def main(modes: Annotated[list[str] | None, typer.Argument(help="Any of fp32, fp32-fused, bf16, bf16-fused "
                                                            "(default: all).")] = None,
         threads: int = 2, batch_size: int = 32) -> None:
    torch.set_num_threads(threads)
    cfg = BuildConfig()
    splits = splits_for(cfg)
    tokenizer = train.load_tokenizer(train.base_model_dir())
    texts = splits.train.texts
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]])
    batches = train.length_bucketed_batches(lengths, batch_size, np.random.default_rng(0))[:40]
    labels = torch.from_numpy(splits.train.labels)
    print(f"native bf16: {train.native_bf16()}; {threads} threads; batch {batch_size}; "
          f"mean {lengths.mean():.1f} tokens per text")
    for layers in (6, cfg.student.layers):
        for mode in modes or MODES:
            step, infer = time_mode(mode, layers, texts, labels, splits.train.label_names, batches, tokenizer,
                                    cfg.max_length)
            print(f"{layers} layers {mode:<11} train {step * 1000:5.0f} ms/step   infer {infer * 1000:5.0f} ms/batch")


if __name__ == "__main__":
    typer.run(main)
