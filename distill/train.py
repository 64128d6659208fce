"""Distil a teacher's embeddings into the student (`dsmd distill`, `make distill`).

Read top to bottom: `train(cfg, out)` sets up (data, feature store, student, optimiser,
queues, balancer), resumes from the latest checkpoint if `out` holds one, then loops over
epochs and steps; each step computes the DSMD losses of METHOD.md §2 on teacher embeddings
looked up *by id*, combines them with the balancer (§3) and updates the student. The val
split is evaluated every epoch; the best checkpoint by RSUM is kept in `out/best`.

Run folder:
    config.json       the resolved config (a resume refuses a different one)
    checkpoints/      step-NNNNNNNN/: student + train_state.pt (optimiser, scheduler position,
                      queues, balancer, scaler, step); the latest named in state.json
    best/             the student with the best val RSUM (what export reads)
    steps.jsonl       every step: raw losses, balancer factors, lr      (TensorBoard: tb/)
    metrics.jsonl     every evaluation: val recall                       (plot: plot.png)
    manifest.json     written last, when training has finished

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
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from tokenizers import Tokenizer
from tqdm import tqdm

from distill import losses as L
from distill.balancer import Balancer
from distill.config import DistillConfig, config_diff
from distill.data import EvalImages, Pairs, TrainBatches, epoch_order
from distill.features import FeatureStore, SplitFeatures, StoreMismatch
from distill.student import (Student, create_student, load_student, make_tokenizer, preset_config, save_student,
                             tokenize)
from distill.train_teacher import cpu_has_bf16
from dsmd.artifacts import read_json, read_manifest, recover_dir, replace_dir, sha256_file, versions, write_json
from dsmd.datasets import Dataset, Item, load_dataset
from dsmd.errors import UserError
from dsmd.retrieval import Recall, chance_rsum, evaluate, format_table


class CollapsedError(UserError):
    """Val recall sits at chance: the student is not learning."""


# ---------------------------------------------------------------- distributed plumbing


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            torch_dist.all_reduce(x)
            x /= self.world
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, in rank order (all ranks hold equal-sized micro-batches)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        torch_dist.broadcast(t, 0)
        return bool(t.item())

    def on_main(self, fn, device: torch.device):
        """Run `fn` on rank 0 only; if it raises, every rank raises (instead of waiting forever)."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if self.broadcast_flag(error is not None, device):
            raise error if error is not None else RuntimeError("rank 0 failed; its log says why")
        return result


def init_dist(device_kind: str) -> Dist:
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_kind == "cuda":
        torch.cuda.set_device(d.local_rank)
    torch_dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return d


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


# ---------------------------------------------------------------- set-up helpers


def resolve_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is cuda but no GPU is visible; use run.device=cpu or auto")
    return kind


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    if amp in ("bf16", "fp16"):
        if amp == "fp16" and device.type != "cuda":
            raise UserError("run.amp=fp16 needs a GPU; use bf16 or off on CPU")
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise UserError(f"run.amp must be auto, bf16, fp16 or off, not {amp!r}")


def lr_at(step: int, steps_per_epoch: int, cfg) -> float:
    """Linear warm-up, then the paper's step decay (x decay at each of decay_epochs)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    epoch = step // steps_per_epoch
    return cfg.lr * cfg.decay ** sum(epoch >= e for e in cfg.decay_epochs)


def usable_items(ds: Dataset, split: str, feats: SplitFeatures) -> list[Item]:
    """Items of a split that the feature store holds (images that failed to decode are left out)."""
    have = set(feats.image_ids.tolist())
    return [it for it in ds.split(split) if it.image_id in have]


def open_store(cfg: DistillConfig, ds: Dataset) -> FeatureStore:
    try:
        store = FeatureStore(cfg.data.features)
    except FileNotFoundError as e:
        raise UserError(f"{e}. Build it first: dsmd features --data {ds.source} --out {cfg.data.features} "
                        f"--teacher ...") from e
    theirs = store.manifest["dataset"]["fingerprint"]
    if theirs != ds.fingerprint():
        raise StoreMismatch(f"the feature store {store.path} was built from another data set "
                            f"(fingerprint {theirs[:12]}, this one {ds.fingerprint()[:12]}); "
                            f"rebuild it with dsmd features")
    return store


@torch.no_grad()
def encode_split(model: Student, tok, items: list[Item], device: torch.device, batch: int = 256,
                 workers: int = 0, amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student embeddings of a split's images and captions (the plain preprocessing spec).

    Returns (image_emb, caption_emb, caption_image) ready for `dsmd.retrieval.evaluate`.
    """
    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    loader = torch.utils.data.DataLoader(EvalImages(items, model.cfg.preprocess()), batch_size=batch,
                                         num_workers=workers)
    with ctx:
        img = torch.cat([model.encode_image(px.to(device)).cpu() for px in loader])
        caps = [c for it in items for c in it.captions]
        txt = []
        for i in range(0, len(caps), batch):
            ids, mask = tokenize(tok, caps[i:i + batch])
            txt.append(model.encode_text(ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
    return img.float().numpy(), torch.cat(txt).float().numpy(), owner


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, model: Student, tok, cfg: DistillConfig, state: dict) -> Path:
    d = out / "checkpoints" / f"step-{state['step']:08d}"
    tmp = d.with_name("." + d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(model, tok, tmp)
    torch.save(state, tmp / "train_state.pt")
    write_json(tmp / "config.json", cfg.to_json())
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    pointer = read_json(out / "state.json") if (out / "state.json").exists() else {}
    write_json(out / "state.json", {**pointer, "latest": str(d.relative_to(out)), "step": state["step"]})
    for old in (out / "checkpoints").glob("step-*"):  # keep only the latest
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return d


def save_best(out: Path, model: Student, tok, cfg: DistillConfig, info: dict) -> None:
    tmp = out / ".best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_student(model, tok, tmp)
    write_json(tmp / "config.json", cfg.to_json())
    write_json(tmp / "best.json", info)
    replace_dir(tmp, out / "best")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be written again),
    and a last line half-written when the run was killed."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        path.write_text("".join(line + "\n" for line in keep))


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
        if dist.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _train(cfg: DistillConfig, out: Path, restart: bool, dist: Dist, device_kind: str) -> dict:
    t_start = time.time()
    device = torch.device(device_kind, dist.local_rank) if device_kind == "cuda" else torch.device("cpu")
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // dist.world))
    log = print if dist.main else (lambda *a, **k: None)
    o = cfg.optim
    if o.batch_size % (dist.world * o.accum_steps):
        raise UserError(f"optim.batch_size {o.batch_size} must divide by processes x accum_steps "
                        f"({dist.world} x {o.accum_steps})")
    micro = o.batch_size // (dist.world * o.accum_steps)

    # -- the run folder: fresh, or resumed with the same config
    resume = None
    if dist.main:
        if restart and out.exists():
            shutil.rmtree(out)
        recover_dir(out / "best")
        for tmp in list(out.glob(".*.tmp")) + list((out / "checkpoints").glob(".*.tmp")):
            shutil.rmtree(tmp, ignore_errors=True)  # a checkpoint being written when the run was killed
    dist.barrier()
    if (out / "config.json").exists():
        saved = read_json(out / "config.json")
        diff = config_diff(saved, cfg.to_json())
        if diff:
            raise UserError(f"{out} holds a run with another config (differs at {', '.join(diff[:6])}); "
                            f"use another --out, or --restart to start this folder over")
        if (out / "state.json").exists():
            resume = out / read_json(out / "state.json")["latest"]
    if read_manifest(out) is not None:
        log(f"{out} holds a finished run (delete it or use --restart to train again)")
        return read_manifest(out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_json())

    # -- data and teacher embeddings
    ds = load_dataset(cfg.data.dataset, images=cfg.data.images)
    store = open_store(cfg, ds)
    train_feats, val_feats = store.split(cfg.data.train_split), store.split(cfg.data.val_split)
    train_items = usable_items(ds, cfg.data.train_split, train_feats)
    val_items = usable_items(ds, cfg.data.val_split, val_feats)
    pairs = Pairs.of(train_items)
    steps_per_epoch = len(pairs) // o.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(pairs)} training pairs make no full batch of {o.batch_size}")
    total_steps = o.epochs * steps_per_epoch

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
            tok = make_tokenizer(cfg.student.text_init, [c for it in train_items for c in it.captions],
                                 sizes.vocab_size, sizes.max_tokens)
            tok.save(str(shared))
        dist.barrier()
        torch.manual_seed(cfg.run.seed)  # the initial weights are a function of the seed too
        model, tok = create_student(cfg.student.preset, store.dim, cfg.student.image_init, cfg.student.text_init,
                                    tokenizer=Tokenizer.from_file(str(shared)), log=log,
                                    logit_scale=cfg.method == "clip", **cfg.student.overrides)
    model.to(device).train()
    counts = model.parameter_counts()
    log(f"student {cfg.student.preset}: {counts['total'] / 1e6:.1f}M parameters (image {counts['image'] / 1e6:.1f}M, "
        f"text {counts['text'] / 1e6:.1f}M), embedding dim {store.dim} from teacher {store.manifest['teacher']['name']}")
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
        state = torch.load(resume / "train_state.pt", map_location="cpu", weights_only=True)
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
            _truncate_jsonl(out / f, step)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if device.type == "cuda" else None) if dist.world > 1 else model

    writer = _tensorboard(out / "tb") if dist.main else None
    step_log = open(out / "steps.jsonl", "a") if dist.main else None
    log(f"{len(train_items)} train images, {len(pairs)} pairs: {o.epochs} epochs x {steps_per_epoch} steps of "
        f"{o.batch_size} ({dist.world} process(es) x {o.accum_steps} accumulation x {micro}); "
        f"losses {'+'.join(names)}, balancer {balancer.cfg.mode}, amp {amp or 'off'}, device {device}")
    bar = tqdm(total=total_steps, initial=step, desc="distil", unit="step", dynamic_ncols=True,
               **({} if dist.main else {"disable": True}))
    seen_t0, seen_steps = time.time(), 0

    while step < total_steps:
        epoch = step // steps_per_epoch
        order = epoch_order(len(pairs), cfg.run.seed, epoch)
        first = step % steps_per_epoch
        batches = TrainBatches(pairs, order, range(first, steps_per_epoch), batch=o.batch_size, accum=o.accum_steps,
                               rank=dist.rank, world=dist.world, pre=pre, aug=cfg.augment, tok=tok,
                               seed=cfg.run.seed, epoch=epoch)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.run.workers,
                                             prefetch_factor=4 if cfg.run.workers else None,
                                             persistent_workers=False)
        it = iter(loader)
        for _ in range(first, steps_per_epoch):
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
                rec = {"step": step, "epoch": epoch + 1, "lr": lr, "loss": raw_sum, "factor": factors}
                step_log.write(json.dumps(rec) + "\n")
                step_log.flush()
                if writer is not None:
                    for n in names:
                        writer.add_scalar(f"loss/{n}", raw_sum[n], step)
                        writer.add_scalar(f"weight/{n}", factors[n], step)
                    writer.add_scalar("lr", lr, step)
                rate = seen_steps * o.batch_size / max(1e-9, time.time() - seen_t0)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{o.epochs}", loss=f"{sum(raw_sum.values()):.3f}",
                                pairs_s=f"{rate:.0f}")
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch and ((epoch + 1) % cfg.run.eval_every == 0 or step == total_steps):
                stop = _evaluate_epoch(out, model, tok, cfg, val_items, device, amp, dist, epoch, step, best,
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
    """One micro-batch: student forward, the losses, the balanced objective; enqueue the teacher rows."""
    ids = b["image_ids"].to(device)
    with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
        s_img, s_txt = ddp(b["pixels"].to(device, non_blocking=True), b["input_ids"].to(device),
                           b["attention_mask"].to(device))
    s_img, s_txt = s_img.float(), s_txt.float()
    losses: dict[str, torch.Tensor] = {}
    enqueue = None
    if cfg.method == "clip":
        scale = model.logit_scale.exp().clamp(max=100)
        losses["clip"] = L.clip_contrastive(s_img, s_txt, ids, scale=scale)
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
            losses["cd"] = (L.contrastive_distill(s_img, t_img, queues["image"].emb, ids, queues["image"].ids, lc.tau)
                            + L.contrastive_distill(s_txt, t_txt, queues["text"].emb, ids, queues["text"].ids, lc.tau))
        if "fd" in names:
            losses["fd"] = L.feature_distill(s_img, t_img, s_txt, t_txt)
        if "sd" in names:
            losses["sd"] = L.similarity_distill(s_img, t_img, s_txt, t_txt)
        if "hnd" in names:
            losses["hnd"] = L.hard_negative_distill(s_img, t_img, s_txt, t_txt, ids, lc.margin)
        if "kl" in names:
            scale = 1 / lc.kl_temperature
            losses["kl"] = L.similarity_kl(s_img, s_txt, t_img, t_txt, scale, scale)
        enqueue = (t_img, t_txt, ids)
    total, factors = balancer(losses, reduce=dist.mean if dist.world > 1 else None)
    return {n: v.detach() for n, v in losses.items()}, total, factors, enqueue


def _enqueue(queues: dict[str, Queue], rows, dist: Dist) -> None:
    """After the backward pass (the loss graph holds the queues): this batch's teacher rows,
    gathered from every rank as MoCo does, join the FIFOs."""
    if rows is not None:
        t_img, t_txt, ids = rows
        all_ids = dist.gather(ids)
        queues["image"].push(dist.gather(t_img), all_ids)
        queues["text"].push(dist.gather(t_txt), all_ids)


def _evaluate_epoch(out: Path, model: Student, tok, cfg: DistillConfig, items: list[Item], device, amp, dist: Dist,
                    epoch: int, step: int, best: dict, writer, bar) -> str | None:
    """Val recall on rank 0 (best checkpoint, metrics, plot); a message on every rank if training must stop."""
    stop = dist.on_main(lambda: _evaluate_on_main(out, model, tok, cfg, items, device, amp, epoch, step, best,
                                                  writer, bar), device)
    if dist.broadcast_flag(stop is not None, device) and stop is None:
        stop = "stopped by rank 0: val recall at chance"
    return stop


def _evaluate_on_main(out: Path, model: Student, tok, cfg: DistillConfig, items: list[Item], device, amp,
                      epoch: int, step: int, best: dict, writer, bar) -> str | None:
    stop = None
    r = evaluate(*encode_split(model, tok, items, device, cfg.run.eval_batch, amp=amp))
    rec = {"step": step, "epoch": epoch + 1, "val": r.to_json(), "rsum": r.rsum, "time": time.time()}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    improved = r.rsum > best["rsum"]
    if improved:
        best.update({"rsum": r.rsum, "epoch": epoch + 1, "step": step, "val": r.to_json()})
        save_best(out, model, tok, cfg, dict(best))
    if writer is not None:
        writer.add_scalar("val/rsum", r.rsum, step)
        for k, v in r.to_json().items():
            if isinstance(v, (int, float)) and k.startswith(("i2t", "t2i")):
                writer.add_scalar(f"val/{k}", v, step)
        writer.flush()
    chance = chance_rsum(len(items), [len(it.captions) for it in items])
    bar.write(f"epoch {epoch + 1}: val RSUM {r.rsum:.1f} (i2t R@1 {r.i2t[1]:.1f}, t2i R@1 {r.t2i[1]:.1f})"
              f"{'  best' if improved else ''}  [chance {chance:.1f}]")
    plot_run(out)
    after = cfg.run.stop_at_chance_after
    if after and epoch + 1 >= after and r.rsum <= 1.5 * chance:
        stop = (f"val RSUM {r.rsum:.1f} after {epoch + 1} epochs is at chance ({chance:.1f}): the student is not "
                f"learning. With margin 0 the magnitude scaling of a vanishing triplet loss can collapse "
                f"training (METHOD.md §7): try --set loss.margin=0.2 or --set balancer.mode=none; a higher "
                f"optim.lr helps students trained from scratch; start over with --restart or a new --out. "
                f"(run.stop_at_chance_after=0 disables this stop.)")
    return stop


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: steps.jsonl and plot.png still hold everything
        return None
    return SummaryWriter(str(path))


def plot_run(out: Path) -> Path | None:
    """plot.png: raw losses, balancer factors (per step) and val RSUM (per epoch) of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line] \
        if (out / "metrics.jsonl").exists() else []
    if not steps:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    x = [s["step"] for s in steps]
    for n in steps[-1]["loss"]:
        ax[0].plot(x, _smooth([s["loss"][n] for s in steps]), label=n)
        ax[1].plot(x, [s["factor"][n] for s in steps], label=n)
    ax[0].set(title="raw losses (smoothed)", xlabel="step", yscale="log")
    ax[1].set(title="balancer factor w·s per loss", xlabel="step", yscale="log")
    ax[2].plot([e["epoch"] for e in evals], [e["rsum"] for e in evals], marker="o")
    ax[2].set(title="val RSUM", xlabel="epoch")
    for a in ax[:2]:
        a.legend()
    fig.tight_layout()
    path = out / "plot.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _smooth(v: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], v[0]
    for x in v:
        m = beta * m + (1 - beta) * x
        out.append(m)
    return out


# ---------------------------------------------------------------- evaluation of a finished student


def resolve_student(path: str | Path) -> Path:
    """A student folder, or a run folder (its best checkpoint)."""
    p = Path(path)
    if (p / "student.json").exists():
        return p
    if (p / "best" / "student.json").exists():
        return p / "best"
    raise UserError(f"{p} is neither a student checkpoint nor a run folder with best/ (has training started?)")


def evaluate_student(student: str | Path, dataset: str | Path, features: str | Path, split: str = "test",
                     images: str | None = None, device: str = "auto") -> tuple[Recall, Recall]:
    """(teacher recall from the feature store, student recall) on the same images and captions."""
    path = resolve_student(student)
    dev = torch.device(resolve_device(device))
    model, tok = load_student(path, dev)
    ds = load_dataset(dataset, images=images)
    cfg = DistillConfig()
    cfg.data.features = str(features)
    store = open_store(cfg, ds)
    if store.dim != model.cfg.dim:
        raise UserError(f"the student embeds into {model.cfg.dim} dims, the feature store's teacher into {store.dim}")
    feats = store.split(split)
    items = usable_items(ds, split, feats)
    student = evaluate(*encode_split(model, tok, items, dev))
    rows = feats.image_rows(np.array([it.image_id for it in items]))
    cap_ids = np.array([c for it in items for c in it.caption_ids])
    owner = np.array([i for i, it in enumerate(items) for _ in it.captions])
    teacher = evaluate(np.asarray(feats.image_emb[rows], np.float32),
                       np.asarray(feats.caption_emb[feats.caption_rows(cap_ids)], np.float32), owner)
    return teacher, student


def side_by_side(teacher: Recall, student: Recall, teacher_name: str = "teacher", student_name: str = "student") -> str:
    table = format_table({teacher_name: teacher, student_name: student})
    frac = student.rsum / teacher.rsum if teacher.rsum else math.nan
    return f"{table}\nthe student keeps {100 * frac:.1f}% of the teacher's RSUM"
