"""What the benchmark scripts share: the machine they ran on, timing, synthetic vectors, a base bundle.

A script in bench/ imports these as `from common import ...` (Python puts the script's own
folder first on sys.path), never another script's private names. Run the scripts with the
project's environment (`.venv/bin/python bench/...`), where `dsmd` is installed.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np

from dsmd.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent

# Texts of several lengths for encoder timing (short to over the demo's token limit).
CAPTIONS = ["a small red circle left of a big blue square", "two yellow stars", "a green triangle",
            "a big purple hexagon above a small orange disc and a cyan square on the right side"]


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set extensions that move CPU inference timings the most."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]


def machine() -> dict:
    """Which machine ran a benchmark, recorded beside its results: figures only compare within one."""
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory_gib = round(mem / 2**20, 1)
    except (OSError, StopIteration):
        memory_gib = None
    return {"cpu": cpu_model(), "arch": platform.machine(), "flags": cpu_flags(), "usable_cores": usable_cpus(),
            "memory_gib": memory_gib, "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}


def machine_line() -> str:
    """The machine in one line, for the head of a results table."""
    m = machine()
    return (f"{m['cpu']} ({', '.join(m['flags']) or 'no AVX-512/bf16'}), {m['usable_cores']} usable cores, "
            f"{m['memory_gib']} GiB; {m['date']}")


def timed(fn, min_seconds: float, min_reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def percentile_ms(times: list[float], p: float) -> float:
    return 1000 * float(np.percentile(times, p))


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, noise: float = 0.6) -> np.ndarray:
    """Unit vectors around `clusters` random centres: real embeddings cluster, and on uniformly random
    vectors no ANN index reaches a useful recall (BENCHMARKS.md, 'Serving under load')."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        x = centres[rng.integers(0, clusters, m)] + noise * rng.normal(size=(m, dim)).astype(np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def held_out(dim: int, m: int) -> np.ndarray:
    """Queries from the clusters of `clustered(..., seed=1)` without regenerating the whole collection."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    r2 = np.random.default_rng(99)
    q = centres[r2.integers(0, 1000, m)] + 0.6 * r2.normal(size=(m, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


WORDS = ["red", "blue", "green", "yellow", "small", "big", "circle", "square", "star", "triangle", "left of", "above"]


def unique_texts(n: int, seed: int = 0) -> list[str]:
    """`n` different demo-world-like queries (a numbered suffix keeps every one unique: no cache hits)."""
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(WORDS[:4])} {rng.choice(WORDS[6:10])} {rng.choice(WORDS[10:])} a {rng.choice(WORDS[4:6])} "
            f"{rng.choice(WORDS[6:10])} #{i}" for i in range(n)]


def make_bundle(preset: str, out: Path, demo_bundle: Path, variant: str = "fp32", data: Path | None = None) -> Path:
    """The demo bundle as it is, or a random-weight `base` student exported the same way (timing only)."""
    if preset == "demo":
        return demo_bundle
    import torch

    from dsmd.distill.student import create_student
    from dsmd.export.onnx import ExportConfig, export, model_encoders

    torch.manual_seed(0)
    model, tok = create_student(preset, 768, captions=unique_texts(2000), log=lambda *a: None)
    # a variant is built only with a recall check; with random weights that check is at chance for
    # both fp32 and the variant, so it passes without meaning anything: this bundle is for timing only
    variants = () if variant == "fp32" else (variant,)
    export(model_encoders(model.eval(), tok), out, data=data if variants else None,
           cfg=ExportConfig(variants=variants, max_drop=600.0), log=lambda *a: None)
    return out
