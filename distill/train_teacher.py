"""Train the demo teacher on the demo world (CLIP's symmetric contrastive loss).

Images are decoded once into memory (the world is small), then each step draws a batch of
images with one random caption each. Batches are shuffled in blocks of two consecutive
images, which keeps the world's sibling pairs (same words, different binding) in the same
batch: the hardest negatives the teacher must learn to tell apart.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from dsmd.artifacts import read_manifest, sha256_file, versions, write_json
from dsmd.cpus import usable_cpus
from dsmd.datasets import Dataset, Item, load_dataset
from dsmd.distill.distributed import cpu_has_bf16
from dsmd.distill.teachers import demo
from dsmd.errors import UserError
from dsmd.images import BadImage, SkipReport, open_image
from dsmd.preprocess import PreprocessConfig, image_to_array
from dsmd.retrieval import Recall, evaluate


@dataclass
class TeacherTrainConfig:
    """Settings of `dsmd train-teacher` (saved in the teacher's manifest)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    eval_every: int = 5  # epochs
    threads: int = 0  # 0: all cores
    bf16: bool = True  # bf16 autocast, taken only where the CPU has native bf16 (elsewhere it is slower)


def load_pixels(items: list[Item], cfg: PreprocessConfig, skips: SkipReport, workers: int = 4) -> np.ndarray:
    """Decode and preprocess images into one float16 (N, 3, H, W) array.

    An unreadable image becomes zeros and is recorded in `skips` (the caller drops it).
    """
    out = np.zeros((len(items), 3, cfg.size, cfg.size), np.float16)

    def work(i: int) -> None:
        try:
            out[i] = image_to_array(open_image(items[i].path), cfg)
        except BadImage as e:
            skips.add(str(items[i].path), str(e))

    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(work, range(len(items))), total=len(items), desc="decode", unit="img", leave=False))
    return out


@torch.no_grad()
def evaluate_model(model: demo.DemoDualEncoder, tok: Tokenizer, pixels: np.ndarray, items: list[Item],
                   batch: int = 256) -> Recall:
    """Val recall of the teacher being trained, on pixels decoded once (the history in its manifest)."""
    model.eval()
    img = torch.cat([model.encode_image(torch.from_numpy(pixels[i:i + batch]).float())
                     for i in range(0, len(pixels), batch)])
    caps = [c for it in items for c in it.captions]
    owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
    txt = torch.cat([model.encode_text(*demo.tokenize(tok, caps[i:i + batch])) for i in range(0, len(caps), batch)])
    model.train()
    return evaluate(img.numpy(), txt.numpy(), owner)


def train_teacher(data: str | Path, out: str | Path, cfg: TeacherTrainConfig | None = None,
                  model_cfg: dict | None = None, images: str | Path | None = None) -> Recall:
    """Train the demo teacher on `data` (a data set path) and save it to `out`.

    Returns the teacher's recall on the val split. The manifest is written last, so a
    killed run leaves no folder that looks finished.
    """
    cfg = cfg or TeacherTrainConfig()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or usable_cpus())
    rng = np.random.default_rng(cfg.seed)
    ds: Dataset = load_dataset(data, images=images)
    train, val = ds.split("train"), ds.split("val")
    train = [it for it in train if it.captions]  # the teacher learns from pairs; captionless images are for students
    if not train or not val:
        raise UserError(f"{ds.source} needs train and val splits to train a teacher (has {ds.counts()})")

    max_tokens = (model_cfg or {}).get("max_tokens", demo.DemoTeacherConfig.max_tokens)
    tok = demo.build_tokenizer([c for it in train for c in it.captions], max_tokens=max_tokens)
    mcfg = demo.DemoTeacherConfig(vocab_size=tok.get_vocab_size(), **(model_cfg or {}))
    pre = mcfg.preprocess_cfg()
    mcfg.preprocess = pre.to_json()
    skips = SkipReport()
    train_px, val_px = load_pixels(train, pre, skips), load_pixels(val, pre, skips)
    bad = {Path(p) for p in skips.skipped}
    keep = np.array([it.path not in bad for it in train])
    train_px, train = train_px[keep], [it for it, k in zip(train, keep) if k]
    keep = np.array([it.path not in bad for it in val])
    val_px, val = val_px[keep], [it for it, k in zip(val, keep) if k]
    if skips:
        print(skips.summary())

    model = demo.DemoDualEncoder(mcfg).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    blocks = len(train) // 2
    steps_per_epoch = max(1, (2 * blocks) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    use_bf16 = cfg.bf16 and cpu_has_bf16()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo teacher: {n_params / 1e6:.2f}M parameters, {len(train)} train images, "
          f"{cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}")
    history, step, t0 = [], 0, time.time()
    bar = tqdm(total=total, desc="train teacher", unit="step")
    for epoch in range(cfg.epochs):
        order = (rng.permutation(blocks)[:, None] * 2 + np.arange(2)).reshape(-1)
        for b in range(steps_per_epoch):
            idx = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            pixels = torch.from_numpy(train_px[idx]).float()
            texts = [train[i].captions[rng.integers(len(train[i].captions))] for i in idx]
            ids, mask = demo.tokenize(tok, texts)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                img = model.encode_image(pixels)
                txt = model.encode_text(ids, mask)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{step * cfg.batch_size / (time.time() - t0):.0f}")
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            r = evaluate_model(model, tok, val_px, val)
            history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(), "val_rsum": r.rsum,
                            "seconds": time.time() - t0})
            bar.write(f"epoch {epoch + 1}: loss {loss.item():.3f}, val RSUM {r.rsum:.1f}")
    bar.close()

    out = Path(out)
    (out / "manifest.json").unlink(missing_ok=True)
    demo.save(model.eval(), tok, out)
    write_json(out / "manifest.json", {
        "artifact": "demo-teacher",
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint()},
        "weights_sha256": sha256_file(out / "model.safetensors"),
        "parameters": n_params,
        "train": vars(cfg),
        "history": history,
        "val_recall": r.to_json(),
        "skipped_images": skips.to_json(),
        "seconds": round(time.time() - t0, 1),
        "versions": versions(),
    })
    return r


def is_trained(out: str | Path) -> bool:
    """True when `out` holds a finished teacher (its manifest is written last), so `make demo` can skip it."""
    return read_manifest(Path(out)) is not None
