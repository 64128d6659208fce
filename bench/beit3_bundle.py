"""BEiT-3 in the serving runtime, beside the student it is distilled into.

Exports a base-size BEiT-3 retrieval model (our implementation, 384 px, 222M parameters) to
an encoder bundle with its sentencepiece tokenizer converted for the bundle runtime (the path
`dsmd export teacher --teacher beit3` takes), and the base student (ViT-B/16 + BERT-base) the
same way; then times both in ONNX Runtime, fp32 and INT8, batch 1, in one process, one after
the other. Weights are random: timing and ONNX-vs-PyTorch parity do not depend on them (the
official checkpoints cannot be downloaded here). The sentencepiece model is a small one trained
on the captions below, so the texts are a few tokens long, as with the real one.

    .venv/bin/python bench/beit3_bundle.py                 # all cores the process may use
    .venv/bin/python bench/beit3_bundle.py --threads 1

Writes bench/results/beit3-bundle/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CAPTIONS, machine_line, timed

from dsmd.cpus import usable_cpus


def _add_int8(folder: Path) -> None:
    """The INT8 graphs `dsmd export` builds (its own quantisation, without its recall check: there is
    no data set for random weights), added to the manifest."""
    from dsmd.artifacts import write_json
    from dsmd.export.onnx import _build_variant

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"]["int8"] = {"files": _build_variant(folder, "int8")}
    write_json(folder / "manifest.json", manifest)


def build(work: Path) -> dict[str, Path]:
    import sentencepiece as spm

    from dsmd.distill.student import create_student
    from dsmd.distill.teachers.beit3_model import BEiT3Config, BEiT3Retrieval
    from dsmd.export.onnx import export, model_encoders, teacher_encoders

    words = " ".join(CAPTIONS).split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(work / "beit3"),
                                   vocab_size=60, hard_vocab_limit=False, model_type="unigram", minloglevel=2)
    torch.manual_seed(0)
    teacher = BEiT3Retrieval(BEiT3Config.base()).eval()
    ckpt = work / "beit3_base_patch16_384_random.pth"
    teacher.save_official(ckpt)
    del teacher
    t0 = time.time()
    export(teacher_encoders("beit3", ckpt, tokenizer=work / "beit3.model"), work / "beit3", log=print)
    print(f"BEiT-3 base exported in {time.time() - t0:.0f} s", flush=True)
    ckpt.unlink()

    student, tok = create_student("base", 768, captions=CAPTIONS * 10, log=lambda *a: None)
    export(model_encoders(student.eval(), tok), work / "student", log=print)
    for name in ("beit3", "student"):
        _add_int8(work / name)
    return {"beit3-base (384 px)": work / "beit3", "student base (224 px)": work / "student"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    p.add_argument("--out", default="bench/results/beit3-bundle")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="beit3-bundle-"))
    try:
        rows, parity = measure(build(work), a)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # about a GB of graphs
    report(rows, parity, a)


def measure(folders: dict[str, Path], a: argparse.Namespace) -> tuple[list[dict], dict]:
    from dsmd.bundle import Bundle, RuntimeOptions

    rows, parity = [], {}
    opts = RuntimeOptions(threads=a.threads)
    for model, folder in folders.items():
        parity[model] = json.loads((folder / "manifest.json").read_text())["figures"]["parity"]
        for variant in ("fp32", "int8"):
            b = Bundle(folder, variant, opts)
            pixels = np.random.default_rng(0).standard_normal((1, 3, b.preprocess.size, b.preprocess.size),
                                                              dtype=np.float32)
            ms = {"image": 1000 * timed(lambda b=b, px=pixels: b.encode_pixels(px), a.seconds),
                  "text": 1000 * timed(lambda b=b: b.encode_texts(CAPTIONS[:1]), a.seconds)}
            rows.append({"model": model, "variant": variant, "image_ms": ms["image"], "text_ms": ms["text"]})
            print(f"{model:22s} {variant}: image {ms['image']:8.1f} ms, text {ms['text']:7.2f} ms", flush=True)
            del b
    return rows, parity


def report(rows: list[dict], parity: dict, a: argparse.Namespace) -> None:
    by = {(r["model"], r["variant"]): r for r in rows}
    lines = [f"Command: `.venv/bin/python bench/beit3_bundle.py --threads {a.threads}`; {machine_line()}. "
             "ONNX Runtime, batch 1, random weights.", "",
             "| model | variant | image ms | text ms | image × student | text × student |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        s = by[("student base (224 px)", r["variant"])]
        lines.append(f"| {r['model']} | {r['variant']} | {r['image_ms']:.1f} | {r['text_ms']:.2f} | "
                     f"{r['image_ms'] / s['image_ms']:.1f} | {r['text_ms'] / s['text_ms']:.1f} |")
    lines += ["", "Parity of each bundle's fp32 graphs against PyTorch (min cosine over the export's parity "
              "images and texts):", ""]
    for model, f in parity.items():
        lines.append(f"- {model}: image {f['min_cosine_image']:.6f}, text {f['min_cosine_text']:.6f} "
                     f"({f['images']} images, {f.get('texts', '?')} texts)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"threads": a.threads, "rows": rows, "parity": parity}, indent=2))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
