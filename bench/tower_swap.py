"""Which tower limits the student? Recall with one of its towers replaced by the teacher's embeddings.

For a distilled student and its teacher's feature store, on one split: the student alone, the
student's image embeddings with the teacher's caption embeddings ("teacher texts"), the teacher's
image embeddings with the student's caption embeddings ("teacher images"), and the teacher alone;
plus the mean cosine of each student tower to the teacher's. Both towers embed into the teacher's
space, so either can be swapped without any mapping. The tower whose swap recovers more RSUM is
the one further from the teacher.

    .venv/bin/python bench/tower_swap.py                      # after make demo (artifacts/student)
    .venv/bin/python bench/tower_swap.py --student runs/demo-s1 --out bench/results/tower-swap-s1

Writes OUT/{results.json,table.md} (default bench/results/tower-swap).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from common import ROOT, machine, machine_line

from dsmd.retrieval import evaluate, format_table


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="artifacts/student", help="a student run or checkpoint folder")
    p.add_argument("--data", default="data/world")
    p.add_argument("--images", help="image root of --data (default: beside the annotation file)")
    p.add_argument("--features", default="artifacts/features", help="the teacher's feature store")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="bench/results/tower-swap")
    a = p.parse_args()

    import torch

    from dsmd.datasets import load_dataset
    from dsmd.distill.checkpoint import resolve_student
    from dsmd.distill.evaluate import encode_split, usable_items
    from dsmd.distill.features import FeatureStore
    from dsmd.distill.student import load_student

    path = resolve_student(a.student)
    model, tok = load_student(path, torch.device("cpu"))
    store = FeatureStore(a.features)
    feats = store.split(a.split)
    items = usable_items(load_dataset(a.data, images=a.images), a.split, feats)
    s_img, s_txt, owner = encode_split(model, tok, items, torch.device("cpu"))
    t_img = np.asarray(feats.image_emb[feats.image_rows(np.array([it.image_id for it in items]))], np.float32)
    cap_ids = np.array([c for it in items for c in it.caption_ids])
    t_txt = np.asarray(feats.caption_emb[feats.caption_rows(cap_ids)], np.float32)

    rows = {"student": evaluate(s_img, s_txt, owner),
            "student images + teacher texts": evaluate(s_img, t_txt, owner),
            "teacher images + student texts": evaluate(t_img, s_txt, owner),
            "teacher": evaluate(t_img, t_txt, owner)}
    cosine = {"images": _mean_cosine(s_img, t_img), "texts": _mean_cosine(s_txt, t_txt)}
    result = {"meta": {"command": "bench/tower_swap.py " + " ".join(sys.argv[1:]), "machine": machine(),
                       "student": str(path), "features": a.features, "split": a.split, "images": len(items),
                       "captions": int(len(cap_ids))},
              "recall": {name: r.to_json() for name, r in rows.items()},
              "mean_cosine_to_teacher": cosine}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (f"Command: `.venv/bin/python bench/tower_swap.py {' '.join(sys.argv[1:])}`; {machine_line()}. "
             f"Student {path}, split {a.split} ({len(items)} images, {len(cap_ids)} captions).\n\n"
             + format_table(rows)
             + f"\n\nMean cosine of the student's embeddings to the teacher's: images {cosine['images']:.3f}, "
             f"texts {cosine['texts']:.3f}.\n")
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
