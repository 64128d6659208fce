"""Encoder latency: PyTorch eager (fp32, bf16 autocast) vs ONNX Runtime (fp32, INT8), per item
and as achieved GFLOP/s against this machine's measured fp32 matrix-multiply peak.

For the `base` student (ViT-B/16 + BERT-base, random weights: timing does not depend on
them) and the `demo` student, image and text encoding at batch 1 and 32. FLOPs are counted
by torch's FlopCounterMode as 2 x multiply-adds. Then the paper's comparison: the base
student against a BEiT-3-large-size teacher encoder (random weights, our implementation,
384 px), same runtime (PyTorch eager fp32), same run, batch 1.

    .venv/bin/python bench/latency.py                 # all cores
    .venv/bin/python bench/latency.py --threads 1 --quick

Writes bench/results/latency/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CAPTIONS, ROOT, machine, timed

from dsmd.cpus import usable_cpus


def matmul_peak(threads: int) -> float:
    """fp32 GFLOP/s of large square matrix multiplies, the best of PyTorch and ONNX Runtime at
    several sizes: the most this machine was seen to do (torch's 2048² alone measured 170 here
    while ONNX Runtime's ViT reached 320, so one library at one size is not the peak)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = max(best, 2 * n ** 3 / timed(lambda: a @ b, 1.0, 3) / 1e9)
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {"a": a.numpy(), "b": b.numpy()}
        best = max(best, 2 * n ** 3 / timed(lambda: sess.run(None, feeds), 1.0, 3) / 1e9)
    return best


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def bench_student(preset: str, dim: int, batches: list[int], threads: int, seconds: float, peak: float) -> list[dict]:
    from dsmd.artifacts import write_json
    from dsmd.bundle import Bundle, RuntimeOptions
    from dsmd.distill.distributed import cpu_has_bf16
    from dsmd.distill.student import create_student
    from dsmd.export.onnx import _build_variant, export_graphs, model_encoders

    torch.manual_seed(0)
    model, tok = create_student(preset, dim, captions=CAPTIONS * 10, log=lambda *a: None)
    model.eval()
    enc = model_encoders(model, tok)
    folder = Path(tempfile.mkdtemp(prefix=f"latency-{preset}-"))
    export_graphs(enc, folder, 17)
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "manifest.json", {
        "artifact": "bundle", "format": 1, "name": preset, "kind": "student", "dim": dim,
        "preprocess": enc.preprocess.to_json(), "files": {},
        "variants": {"fp32": {"files": {"image": "image.onnx", "text": "text.onnx"}},
                     "int8": {"files": _build_variant(folder, "int8")}}})  # the quantisation dsmd export applies
    opts = RuntimeOptions(threads=threads)
    runtimes = {"onnx fp32": Bundle(folder, "fp32", opts), "onnx int8": Bundle(folder, "int8", opts)}
    torch.set_num_threads(threads)
    size = enc.preprocess.size
    rows = []
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size)
        texts = (CAPTIONS * batch)[:batch]
        ids, mask = (torch.tensor(x) for x in zip(*[(e.ids, e.attention_mask) for e in tok.encode_batch(texts)]))
        work = {
            "image": {"flop": flops(lambda: model.encode_image(pixels)),
                      "torch fp32": lambda: model.encode_image(pixels),
                      "onnx": lambda rt: rt.encode_pixels(pixels.numpy())},
            "text": {"flop": flops(lambda: model.encode_text(ids, mask)),
                     "torch fp32": lambda: model.encode_text(ids, mask),
                     "onnx": lambda rt: rt.encode_texts(texts)},
        }
        for part, w in work.items():
            results = {}
            with torch.no_grad():
                results["torch fp32"] = timed(w["torch fp32"], seconds)
                if cpu_has_bf16():
                    def bf16(f=w["torch fp32"]):
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            return f()
                    results["torch bf16"] = timed(bf16, seconds)
            for name, rt in runtimes.items():
                results[name] = timed(lambda rt=rt, f=w["onnx"]: f(rt), seconds)
            base = results["torch fp32"]
            for runtime, t in results.items():
                gflops = w["flop"] / t / 1e9
                rows.append({"model": preset, "part": part, "batch": batch, "runtime": runtime,
                             "ms_per_item": 1000 * t / batch, "speedup_vs_torch_fp32": base / t,
                             "gflop_per_item": w["flop"] / batch / 1e9, "gflop_s": gflops,
                             "pct_of_peak": 100 * gflops / peak})
                print(f"{preset:5s} {part:5s} b{batch:<3d} {runtime:11s} {1000 * t / batch:9.2f} ms/item  "
                      f"x{base / t:5.2f}  {gflops:7.1f} GFLOP/s ({100 * gflops / peak:4.1f}% of peak)", flush=True)
    return rows


def paper_comparison(threads: int, seconds: float) -> dict:
    """Base student vs a BEiT-3-large-size teacher, batch 1, image + text, PyTorch eager fp32."""
    from dsmd.distill.student import create_student
    from dsmd.distill.teachers.beit3 import BEiT3Config, BEiT3Retrieval

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student, tok = create_student("base", 768, captions=CAPTIONS * 10, log=lambda *a: None)
    student.eval()
    teacher = BEiT3Retrieval(BEiT3Config.large()).eval()
    s_px, t_px = torch.randn(1, 3, 224, 224), torch.randn(1, 3, teacher.cfg.img_size, teacher.cfg.img_size)
    enc = tok.encode_batch(CAPTIONS[:1])
    ids, mask = torch.tensor([enc[0].ids]), torch.tensor([enc[0].attention_mask])
    t_ids = torch.randint(5, 1000, (1, ids.shape[1]))
    t_pad = torch.zeros_like(t_ids, dtype=torch.bool)
    with torch.no_grad():
        s = {"image": timed(lambda: student.encode_image(s_px), seconds),
             "text": timed(lambda: student.encode_text(ids, mask), seconds)}
        t = {"image": timed(lambda: teacher.encode_image(t_px, attention="sdpa"), seconds, min_reps=2),
             "text": timed(lambda: teacher.encode_text(t_ids, t_pad, attention="sdpa"), seconds)}
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {"student_params": params(student), "teacher_params": params(teacher),
           "teacher_image_size": teacher.cfg.img_size,
           "student_ms": {k: 1000 * v for k, v in s.items()}, "teacher_ms": {k: 1000 * v for k, v in t.items()},
           "speedup": {k: t[k] / s[k] for k in s}, "speedup_total": sum(t.values()) / sum(s.values())}
    print(f"BEiT-3-large-size teacher vs base student (batch 1, torch fp32): image x{out['speedup']['image']:.1f}, "
          f"text x{out['speedup']['text']:.1f}, both x{out['speedup_total']:.1f}", flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | part | batch | runtime | ms / item | × vs torch fp32 | GFLOP / item | GFLOP/s | % of peak |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['part']} | {r['batch']} | {r['runtime']} | {r['ms_per_item']:.2f} | "
                     f"{r['speedup_vs_torch_fp32']:.2f} | {r['gflop_per_item']:.2f} | {r['gflop_s']:.1f} | "
                     f"{r['pct_of_peak']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    p.add_argument("--quick", action="store_true", help="demo preset only, no BEiT-3 comparison")
    p.add_argument("--out", default="bench/results/latency")
    a = p.parse_args()
    peak = matmul_peak(a.threads)
    print(f"fp32 matmul peak, {a.threads} thread(s): {peak:.1f} GFLOP/s", flush=True)
    rows = []
    for preset, dim in ([("demo", 256)] if a.quick else [("base", 768), ("demo", 256)]):
        rows += bench_student(preset, dim, [1, 32], a.threads, a.seconds, peak)
    comparison = None if a.quick else paper_comparison(a.threads, a.seconds)
    out = Path(ROOT / a.out)
    out.mkdir(parents=True, exist_ok=True)
    from dsmd.artifacts import versions

    meta = {"threads": a.threads, "matmul_peak_gflop_s": peak, "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "versions": versions()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "paper_comparison": comparison},
                                                 indent=2))
    md = (f"Command: `.venv/bin/python bench/latency.py {' '.join(sys.argv[1:])}`; {a.threads} thread(s); "
          f"fp32 matmul peak {peak:.1f} GFLOP/s; {meta['date']}\n\n" + table(rows) + "\n")
    if comparison:
        c = comparison
        md += (f"\nBEiT-3-large-size teacher ({c['teacher_params'] / 1e6:.0f}M, {c['teacher_image_size']} px) vs base "
               f"student ({c['student_params'] / 1e6:.0f}M, 224 px), batch 1, PyTorch eager fp32: image "
               f"{c['teacher_ms']['image']:.0f} vs {c['student_ms']['image']:.0f} ms (x{c['speedup']['image']:.1f}), "
               f"text {c['teacher_ms']['text']:.1f} vs {c['student_ms']['text']:.1f} ms "
               f"(x{c['speedup']['text']:.1f}); both x{c['speedup_total']:.1f}\n")
    (out / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
