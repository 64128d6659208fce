"""Distil a teacher's embeddings into the student (`dsmd distill`, `make distill`).

Read top to bottom: `train(cfg, out)` sets up (data, feature store, student, optimiser,
queues, balancer), resumes from the latest checkpoint if `out` holds one, then loops over
epochs and steps; each step computes the DSMD losses of METHOD.md §2 on teacher embeddings
looked up *by id*, combines them with the balancer (§3) and updates the student. The val
split is evaluated every epoch; the best checkpoint by RSUM is kept in `out/best`.

The rooms around the loop: distill/distributed.py (processes, devices, autocast),
distill/checkpoint.py (the run folder, checkpoints, resume), distill/evaluate.py (val recall
each epoch, the best checkpoint, evaluation of a finished student), distill/run_log.py
(TensorBoard and plot.png).

Exact resume: the data order and augmentation are functions of (seed, epoch, pair), and the
torch RNG (dropout) is re-seeded from (seed, step, rank) every step, so no RNG state needs
saving and a killed run continues exactly where its last checkpoint was taken (bit for bit on
CPU; on GPUs within the non-determinism of their kernels).

Several processes (torchrun) and gradient accumulation split each global batch into
micro-batches. The queues enqueue the teacher rows of every process (gathered, as MoCo
does), but the in-batch losses (the hardest-negative triplet, the KL and CLIP baselines) see
their own micro-batch only, and the balancer's loss history advances once per micro-batch
(with the losses averaged over processes, so every process uses the same weights).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from dsmd.artifacts import sha256_file, versions, write_json
from dsmd.cpus import usable_cpus
from dsmd.datasets import load_dataset
from dsmd.distill.balancer import Balancer
from dsmd.distill.checkpoint import load_train_state, open_run, save_checkpoint, truncate_jsonl
from dsmd.distill.config import DistillConfig, OptimConfig
from dsmd.distill.data import Pairs, TrainBatches, epoch_order, split_pairs
from dsmd.distill.distributed import Dist, amp_dtype, close_dist, init_dist, resolve_device
from dsmd.distill.evaluate import CollapsedError, evaluate_epoch, open_store, usable_items
from dsmd.distill.features import SplitFeatures, StoreMismatch
from dsmd.distill.losses import (
    clip_contrastive,
    contrastive_distill,
    feature_distill,
    hard_negative_distill,
    similarity_distill,
    similarity_kl,
)
from dsmd.distill.run_log import tensorboard
from dsmd.distill.student import Student, create_student, load_student, make_tokenizer, preset_config
from dsmd.errors import UserError

# ---------------------------------------------------------------- queues of teacher embeddings


class Queue:
    """A FIFO of teacher embeddings and their image ids (id -1 marks an empty slot)."""

    def __init__(self, size: int, dim: int, device: torch.device):
        self.emb = torch.zeros(size, dim, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    def push(self, emb: torch.Tensor, ids: torch.Tensor) -> None:
        size = len(self.ids)
        emb, ids = emb[-size:], ids[-size:]
        slots = (self.ptr + torch.arange(len(ids), device=self.ids.device)) % size
        self.emb[slots] = emb.to(self.emb.dtype)
        self.ids[slots] = ids
        self.ptr = int((self.ptr + len(ids)) % size)

    def state_dict(self) -> dict:
        return {"emb": self.emb.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr}

    def load_state_dict(self, s: dict) -> None:
        if s["emb"].shape != self.emb.shape:
            raise UserError(f"saved queue has shape {tuple(s['emb'].shape)}, the config asks for "
                            f"{tuple(self.emb.shape)}")
        self.emb.copy_(s["emb"])
        self.ids.copy_(s["ids"])
        self.ptr = int(s["ptr"])



def lr_at(step: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then the paper's step decay (x decay at each of decay_epochs) or a cosine to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        total = cfg.steps or steps_per_epoch * cfg.epochs
        done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, done)))
    epoch = step // steps_per_epoch
    return cfg.lr * cfg.decay ** sum(epoch >= e for e in cfg.decay_epochs)



# ---------------------------------------------------------------- the training loop


def train(cfg: DistillConfig, out: str | Path, restart: bool = False) -> dict:
    """Train a student as `cfg` says into the run folder `out`; resumes a run found there.

    Returns the manifest of the finished run (best val recall, teacher, data set, timing).
    """
    out = Path(out)
    device_kind = resolve_device(cfg.run.device)
    dist = init_dist(device_kind)
    try:
        return _train(cfg, out, restart, dist, device_kind)
    finally:
        close_dist(dist)


def _train(cfg: DistillConfig, out: Path, restart: bool, dist: Dist, device_kind: str) -> dict:
    t_start = time.time()
    device = torch.device(device_kind, dist.local_rank) if device_kind == "cuda" else torch.device("cpu")
    torch.set_num_threads(cfg.run.threads or max(1, usable_cpus() // dist.world))
    log = print if dist.main else (lambda *a, **k: None)
    o = cfg.optim
    if o.batch_size % (dist.world * o.accum_steps):
        raise UserError(f"optim.batch_size {o.batch_size} must divide by processes x accum_steps "
                        f"({dist.world} x {o.accum_steps})")
    micro = o.batch_size // (dist.world * o.accum_steps)

    # -- the run folder: fresh, or resumed with the same config
    resume, finished = open_run(out, cfg, restart, dist.main, dist.barrier)
    if finished is not None:
        log(f"{out} holds a finished run (delete it or use --restart to train again)")
        return finished

    # -- data and teacher embeddings
    ds = load_dataset(cfg.data.dataset, images=cfg.data.images)
    store = open_store(cfg, ds)
    train_feats, val_feats = store.split(cfg.data.train_split), store.split(cfg.data.val_split)
    train_items = usable_items(ds, cfg.data.train_split, train_feats)
    val_items = usable_items(ds, cfg.data.val_split, val_feats)
    train_items, unpaired = split_pairs(train_items, cfg.data.pairs_fraction, cfg.data.unpaired)
    missing = [k for k in cfg.data.unpaired if not getattr(unpaired, k)]
    if missing:
        raise UserError(f"data.unpaired asks for {' and '.join(missing)}, but the training split has none to spare: "
                        f"every captioned image is a pair (lower data.pairs_fraction) and "
                        f"{'no image lacks captions' if 'images' in missing else 'no caption is left over'}")
    unpaired_per = max(1, round(cfg.data.unpaired_ratio * micro)) if unpaired.images or unpaired.captions else 0
    pairs = Pairs.of(train_items)
    steps_per_epoch = len(pairs) // o.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(pairs)} training pairs make no full batch of {o.batch_size}")
    total_steps = o.steps or o.epochs * steps_per_epoch
    epochs = -(-total_steps // steps_per_epoch)

    # -- student
    if resume is not None:
        model, tok = load_student(resume)
        model = model.train()
        if cfg.method == "clip":
            model, tok = _with_logit_scale(model, tok)
    else:
        # rank 0 learns the vocabulary; every rank then reads that one file
        shared = out / "tokenizer.json"
        if dist.main:
            sizes = preset_config(cfg.student.preset, store.dim, **cfg.student.overrides)
            texts = [c for it in train_items for c in it.captions] + [it.captions[c] for it, c in unpaired.captions]
            tok = make_tokenizer(cfg.student.text_init, texts,
                                 sizes.vocab_size, sizes.max_tokens)
            tok.save(str(shared))
        dist.barrier()
        # the initial weights are a function of the seed too (or of their own, to tell apart what varies)
        torch.manual_seed(cfg.run.seed if cfg.run.init_seed < 0 else cfg.run.init_seed)
        model, tok = create_student(cfg.student.preset, store.dim, cfg.student.image_init, cfg.student.text_init,
                                    tokenizer=Tokenizer.from_file(str(shared)), log=log,
                                    logit_scale=cfg.method == "clip", **cfg.student.overrides)
        if cfg.method == "clip":
            model.logit_scale.data.fill_(math.log(1 / cfg.loss.clip_temperature))
    model.to(device).train()
    counts = model.parameter_counts()
    log(f"student {cfg.student.preset}: {counts['total'] / 1e6:.1f}M parameters (image {counts['image'] / 1e6:.1f}M, "
        f"text {counts['text'] / 1e6:.1f}M), embedding dim {store.dim} from teacher "
        f"{store.manifest['teacher']['name']}")
    pre = model.cfg.preprocess()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr)
    amp = amp_dtype(cfg.run.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    queues = {m: Queue(cfg.loss.queue_size, store.dim, device) for m in ("image", "text")}
    names = cfg.loss.use if cfg.method == "dsmd" else ["clip"]
    balancer = Balancer(names, cfg.balancer if cfg.method == "dsmd" else replace(cfg.balancer, mode="none"))
    step, best = 0, {"rsum": -1.0}
    if resume is not None:
        state = load_train_state(resume)
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        for m, q in queues.items():
            q.load_state_dict(state["queues"][m])
        balancer.load_state_dict(state["balancer"])
        step, best = state["step"], state["best"]
        if state.get("teacher") != store.manifest["teacher"]:
            raise StoreMismatch(f"{out} was trained on features of another teacher ({state.get('teacher')}); "
                                f"{store.path} now holds {store.manifest['teacher']}: use --restart")
        if cfg.method == "clip":
            model.logit_scale.data.fill_(state["logit_scale"])
        log(f"resuming {out} at step {step} (epoch {step // steps_per_epoch + 1}, "
            f"{step % steps_per_epoch}/{steps_per_epoch})")
    if dist.main:
        for f in ("steps.jsonl", "metrics.jsonl"):
            truncate_jsonl(out / f, step)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.world > 1 else model

    writer = tensorboard(out / "tb") if dist.main else None
    step_log = open(out / "steps.jsonl", "a") if dist.main else None
    log(f"{len(train_items)} train images, {len(pairs)} pairs"
        + (f", unpaired {len(unpaired.images)} images and {len(unpaired.captions)} captions ({unpaired_per} of each "
           f"kind a micro-batch)" if unpaired_per else "")
        + f": {total_steps} steps ({epochs} epochs of {steps_per_epoch}) of "
        f"{o.batch_size} ({dist.world} process(es) x {o.accum_steps} accumulation x {micro}); "
        f"losses {'+'.join(names)}, balancer {balancer.cfg.mode}, amp {amp or 'off'}, device {device}")
    bar = tqdm(total=total_steps, initial=step, desc="distil", unit="step", dynamic_ncols=True,
               **({} if dist.main else {"disable": True}))
    seen_t0, seen_steps = time.time(), 0

    while step < total_steps:
        epoch = step // steps_per_epoch
        order = epoch_order(len(pairs), cfg.run.seed, epoch)
        first = step % steps_per_epoch
        last = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)  # optim.steps may end mid-epoch
        batches = TrainBatches(pairs, order, range(first, last), batch=o.batch_size, accum=o.accum_steps,
                               rank=dist.rank, world=dist.world, pre=pre, aug=cfg.augment, tok=tok,
                               seed=cfg.run.seed, epoch=epoch, steps_per_epoch=steps_per_epoch, unpaired=unpaired,
                               unpaired_per=unpaired_per)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.run.workers,
                                             prefetch_factor=4 if cfg.run.workers else None,
                                             persistent_workers=False)
        it = iter(loader)
        for _ in range(first, last):
            torch.manual_seed(hash((cfg.run.seed, step, dist.rank)) % 2**62)  # dropout: a function of the step
            lr = lr_at(step, steps_per_epoch, o)
            for g in opt.param_groups:
                g["lr"] = lr
            raw_sum: dict[str, float] = {}
            factors: dict[str, float] = {}
            for a in range(o.accum_steps):
                b = next(it)
                sync = a == o.accum_steps - 1 or dist.world == 1
                with (nullcontext() if sync else ddp.no_sync()):
                    losses, total, factors, rows = _forward(ddp, model, b, train_feats, queues, balancer, cfg,
                                                            names, device, amp, dist)
                    scaler.scale(total / o.accum_steps).backward()
                _enqueue(queues, rows, dist)
                for n, v in losses.items():
                    raw_sum[n] = raw_sum.get(n, 0.0) + float(v) / o.accum_steps
            if o.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen_steps += 1
            if dist.main:
                rec = {"step": step, "epoch": epoch + 1, "lr": lr, "loss": raw_sum, "factor": factors,
                       "weight": dict(balancer.weights)}
                step_log.write(json.dumps(rec) + "\n")
                step_log.flush()
                if writer is not None:
                    for n in names:
                        writer.add_scalar(f"loss/{n}", raw_sum[n], step)
                        writer.add_scalar(f"factor/{n}", factors[n], step)
                        writer.add_scalar(f"weight/{n}", balancer.weights[n], step)
                    writer.add_scalar("lr", lr, step)
                rate = seen_steps * o.batch_size / max(1e-9, time.time() - seen_t0)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{sum(raw_sum.values()):.3f}",
                                pairs_s=f"{rate:.0f}")
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if end_of_epoch and ((epoch + 1) % cfg.run.eval_every == 0 or step == total_steps):
                stop = evaluate_epoch(out, model, tok, cfg, val_items, device, amp, dist, epoch, step, best,
                                       writer, bar)
                if stop:
                    bar.close()
                    raise CollapsedError(stop)
            if end_of_epoch or step % cfg.run.checkpoint_every == 0:
                dist.on_main(lambda: save_checkpoint(out, model, tok, cfg, {
                        "step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "queues": {m: q.state_dict() for m, q in queues.items()},
                        "balancer": balancer.state_dict(), "best": best, "teacher": store.manifest["teacher"],
                        "logit_scale": float(model.logit_scale.detach()) if cfg.method == "clip" else 0.0,
                    }), device)
        del it, loader
    bar.close()
    if step_log is not None:
        step_log.close()
    if writer is not None:
        writer.close()

    manifest = {
        "artifact": "student",
        "best": best,
        "parameters": counts,
        "teacher": store.manifest["teacher"],
        "features": str(store.path),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint()},
        "best_weights_sha256": sha256_file(out / "best" / "model.safetensors") if (out / "best").exists() else None,
        "steps": step,
        "seconds_this_session": round(time.time() - t_start, 1),
        "world_size": dist.world,
        "versions": versions(),
    }
    if dist.main:
        write_json(out / "manifest.json", manifest)
    dist.barrier()
    return manifest



def _with_logit_scale(model: Student, tok):
    """A loaded student (saved without CLIP's temperature) given the parameter back for resuming."""
    fresh = Student(replace(model.cfg, logit_scale=True))
    fresh.load_state_dict(model.state_dict(), strict=False)
    return fresh.train(), tok


def _forward(ddp, model: Student, b: dict, feats: SplitFeatures, queues: dict[str, Queue], balancer: Balancer,
             cfg: DistillConfig, names: list[str], device: torch.device, amp, dist: Dist):
    """One micro-batch: student forward, the losses, the balanced objective; enqueue the teacher rows.

    The batch's first `pairs` image and text rows are pairs; rows past them (data.unpaired) have one
    side only and enter the losses that compare a student row with the teacher's row of the same
    input: contrastive, feature, similarity and the within-modality triplets."""
    n = b["pairs"]
    img_ids = b["image_ids"].to(device)
    txt_ids = b["caption_image_ids"].to(device)
    ids = img_ids[:n]
    with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
        s_img, s_txt = ddp(b["pixels"].to(device, non_blocking=True), b["input_ids"].to(device),
                           b["attention_mask"].to(device))
    s_img, s_txt = s_img.float(), s_txt.float()
    losses: dict[str, torch.Tensor] = {}
    enqueue = None
    if cfg.method == "clip":
        scale = model.logit_scale.exp().clamp(max=100)
        losses["clip"] = clip_contrastive(s_img[:n], s_txt[:n], ids, scale=scale)
    else:
        # teacher knowledge by id, never by position in the batch
        t_img = torch.from_numpy(np.asarray(feats.image_emb[feats.image_rows(b["image_ids"].numpy())],
                                            dtype=np.float32)).to(device)
        t_txt = torch.from_numpy(np.asarray(feats.caption_emb[feats.caption_rows(b["caption_ids"].numpy())],
                                            dtype=np.float32)).to(device)
        # fp16 storage leaves rows a hair off unit length
        t_img, t_txt = torch.nn.functional.normalize(t_img, dim=-1), torch.nn.functional.normalize(t_txt, dim=-1)
        lc = cfg.loss
        if "cd" in names:
            losses["cd"] = (contrastive_distill(s_img, t_img, queues["image"].emb, img_ids, queues["image"].ids, lc.tau)
                            + contrastive_distill(s_txt, t_txt, queues["text"].emb, txt_ids, queues["text"].ids,
                                                  lc.tau))
        if "fd" in names:
            losses["fd"] = feature_distill(s_img, t_img, s_txt, t_txt)
        if "sd" in names:
            losses["sd"] = similarity_distill(s_img, t_img, s_txt, t_txt)
        if "hnd" in names:
            losses["hnd"] = hard_negative_distill(s_img, t_img, s_txt, t_txt, ids, lc.margin, img_ids, txt_ids)
        if "kl" in names:
            scale = 1 / lc.kl_temperature
            losses["kl"] = similarity_kl(s_img[:n], s_txt[:n], t_img[:n], t_txt[:n], scale, scale)
        enqueue = (t_img, img_ids, t_txt, txt_ids)
    total, factors = balancer(losses, reduce=dist.mean if dist.world > 1 else None)
    return {n: v.detach() for n, v in losses.items()}, total, factors, enqueue


def _enqueue(queues: dict[str, Queue], rows, dist: Dist) -> None:
    """After the backward pass (the loss graph holds the queues): this batch's teacher rows,
    gathered from every rank as MoCo does, join the FIFOs."""
    if rows is not None:
        t_img, img_ids, t_txt, txt_ids = rows
        queues["image"].push(dist.gather(t_img), dist.gather(img_ids))
        queues["text"].push(dist.gather(t_txt), dist.gather(txt_ids))

