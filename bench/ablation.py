"""The ablation benchmark: the paper's Tables 4 and 5 on the demo world.

Trains the same student at the same budget (the demo config's steps) in each variant:
DSMD with all four losses; the same student trained directly on image-caption pairs with
CLIP's contrastive loss (no teacher); each loss removed; the triplet alone; the peers'
similarity-KL loss alone (open_clip's distiller, TinyCLIP); the balancer's `none` and
`reference` variants; and the paper's exact margin 0. Every run is evaluated on the test
split beside the teacher. Results: a JSON file, a Markdown table and a bar chart.

    .venv/bin/python bench/ablation.py                       # all variants, seed 0
    .venv/bin/python bench/ablation.py --seeds 0 1 --only dsmd clip
    .venv/bin/python bench/ablation.py --set optim.epochs=1 --out bench/results/ablation-1epoch  # a shorter budget

Runs already finished in --out are reused (their run folders, or the records kept in
--out/results.json when the folders are gone, as in a fresh clone), so an interrupted benchmark
continues, and the table covers every finished run in --out (add seeds with a second invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, machine_line

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dsmd": ("DSMD: CD+FD+SD+HND, dynamic balancer", []),
    "clip": ("direct training, CLIP loss (no teacher)", ["method=clip"]),
    # its settings are the winner of bench/direct_sweep.py, given with --tuned-direct
    "clip-tuned": ("direct training, tuned on val (bench/direct_sweep.py)", ["method=clip"]),
    "dsmd-unpaired": ("DSMD + unpaired images (the training images past the pairs)", ['data.unpaired=["images"]']),
    "no-cd": ("w/o CD", ['loss.use=["fd","sd","hnd"]']),
    "no-fd": ("w/o FD", ['loss.use=["cd","sd","hnd"]']),
    "no-sd": ("w/o SD", ['loss.use=["cd","fd","hnd"]']),
    "no-hnd": ("w/o HND", ['loss.use=["cd","fd","sd"]']),
    "hnd-only": ("HND alone", ['loss.use=["hnd"]']),
    "kl-only": ("similarity KL alone (open_clip/TinyCLIP distiller)", ['loss.use=["kl"]']),
    "bal-none": ("balancer none (plain sum)", ["balancer.mode=none"]),
    "bal-reference": ("balancer reference (released prototype)", ["balancer.mode=reference"]),
    "bal-ema": ("balancer rates from a per-step EMA (not DWA's window means)", ["balancer.window=0"]),
    "margin-0": ("paper's margin 0", ["loss.margin=0.0"]),
}


def _setup(config: str, sets: list[str]) -> tuple[str, list[str]]:
    """What makes runs comparable: the config and the --set overrides, less the seed and the thread
    count (one thread or two changes the float order like another seed, not the recipe)."""
    return config, sorted(x for x in sets if not x.startswith(("run.seed=", "run.threads=")))


def _records(out: Path) -> list[dict]:
    found = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    return found + [json.loads(f.read_text()) for f in sorted(out.glob("*-s*/test_recall.json"))]


def _setup_of(r: dict) -> tuple[str, list[str]]:
    """A record's setup; one without (older ones) counts as the default config with no overrides."""
    mine = r.get("variant_settings", VARIANTS.get(r["variant"], ("", []))[1])
    own = [x for x in r.get("settings", []) if x not in mine]
    return _setup(r.get("config", "configs/demo.json"), own)


def kept_records(out: Path) -> dict[tuple[str, int], dict]:
    """The finished runs in --out: results.json (committed), overlaid by the run folders
    (gitignored), so a clone regenerates the table without training again. Failed runs are
    not kept: they are trained again."""
    return {(r["variant"], r["seed"]): r for r in _records(out) if r["variant"] in VARIANTS and "student" in r}


def other_setups(out: Path, config: str, sets: list[str] | None) -> set[str]:
    """The setups of runs in --out that differ from this one: a table mixes only runs of one setup."""
    want = _setup(config, list(sets or []))
    return {" ".join([c, *o]) for c, o in map(_setup_of, _records(out)) if (c, o) != want}


def tuned_settings(name: str, args) -> list[str]:
    """clip-tuned's settings: the winner of bench/direct_sweep.py (--tuned-direct); none for the others."""
    if name != "clip-tuned":
        return []
    if not getattr(args, "tuned_direct", None):
        sys.exit("clip-tuned takes its settings from bench/direct_sweep.py: give its best.json with --tuned-direct")
    return json.loads(Path(args.tuned_direct).read_text())["settings"]


def run_variant(name: str, seed: int, args) -> dict:
    out = Path(args.out) / f"{name}-s{seed}"
    result = out / "test_recall.json"
    mine = VARIANTS[name][1] + tuned_settings(name, args)
    kept = kept_records(Path(args.out)).get((name, seed))
    if kept is not None:
        if kept.get("variant_settings", mine) != mine:
            sys.exit(f"{args.out} holds {name} seed {seed} trained with {kept['variant_settings']}, not {mine}: "
                     "give these settings their own --out")
        return {**kept, "reused": True}
    # the overrides for every variant win over a variant's own, but not over the tuned baseline's settings
    sets = VARIANTS[name][1] + [f"run.seed={seed}"] + list(args.set or []) + tuned_settings(name, args)
    cmd = [sys.executable, "-m", "dsmd.cli", "distill", "--config", args.config, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    (Path(args.out) / f"{name}-s{seed}.log").write_text(done.stdout + done.stderr)
    record = {"variant": name, "seed": seed, "seconds": round(seconds, 1), "returncode": done.returncode,
              "config": args.config, "settings": sets, "variant_settings": mine, "date": time.strftime("%Y-%m-%d"),
              "machine": machine()}
    if (out / "best" / "student.json").exists():
        from dsmd.distill.config import load_config
        from dsmd.distill.evaluate import evaluate_student

        cfg = load_config(args.config, args.set)
        teacher, student = evaluate_student(out, cfg.data.dataset, cfg.data.features, "test", images=cfg.data.images,
                                            device="cpu")
        record.update({"teacher": teacher.to_json(), "student": student.to_json(),
                       "stopped": done.returncode != 0})
    else:
        record["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(record, indent=2))
    return record


def table(records: list[dict]) -> str:
    """Markdown: one row per variant (mean over seeds), test split."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    teacher = next(r["teacher"] for r in records if "teacher" in r)
    direct = by.get("clip-tuned") or by.get("clip")
    direct_rsum = _mean([r["student"]["rsum"] for r in direct if "student" in r]) if direct else None
    lines = ["| variant | seeds | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 | RSUM (mean ± sd) | % of teacher "
             "| vs direct |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             _row("teacher (demo CNN, 2.2M)", [teacher], teacher["rsum"], None, "—")]
    for name, rs in by.items():
        ok = [r["student"] for r in rs if "student" in r]
        if not ok:
            lines.append(f"| {VARIANTS[name][0]} | {len(rs)} | failed: {rs[0].get('error', '')} ||||||||")
            continue
        note = " (stopped at chance)" if any(r.get("stopped") for r in rs) else ""
        spread = f" ± {statistics.stdev(x['rsum'] for x in ok):.1f}" if len(ok) > 1 else ""  # sample sd
        lines.append(_row(VARIANTS[name][0] + note, ok, teacher["rsum"], direct_rsum, spread, len(rs)))
    return "\n".join(lines)


def comparisons(records: list[dict]) -> str:
    """One sentence per variant against DSMD: the difference of the means, and whether it is
    outside the seed spread, by a rule of thumb rather than a significance test: larger than the
    sum of the two sample sds, so that the ±1 sd bars do not touch."""
    rsums: dict[str, list[float]] = {}
    for r in records:
        if "student" in r:
            rsums.setdefault(r["variant"], []).append(r["student"]["rsum"])
    base = rsums.get("dsmd", [])
    if len(base) < 2 or len(rsums) < 2:
        return ""
    base_sd = statistics.stdev(base)
    lines = [(f"Against DSMD ({_mean(base):.1f} ± {base_sd:.1f}, {len(base)} seeds); a rule of thumb, not a "
              "significance test: a difference counts when it is larger than the sum of the two sample sds:"), ""]
    for name, xs in rsums.items():
        if name == "dsmd":
            continue
        diff = _mean(xs) - _mean(base)
        if len(xs) < 2:
            lines.append(f"- {VARIANTS[name][0]}: {diff:+.1f}, one seed only: no spread to judge it by.")
            continue
        spread = base_sd + statistics.stdev(xs)
        verdict = ("outside the seed spread: " + ("worse" if diff < 0 else "better") + " than DSMD"
                   if abs(diff) > spread else "inside the seed spread: not distinguishable with these seeds")
        lines.append(f"- {VARIANTS[name][0]}: {_mean(xs):.1f} ± {statistics.stdev(xs):.1f}, {diff:+.1f} "
                     f"(sds sum to {spread:.1f}), {verdict}.")
    return "\n".join(lines)


def _row(label, recs, teacher_rsum, direct_rsum, spread, n=1) -> str:
    m = {k: _mean([r[k] for r in recs]) for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                                                  "t2i_R@10", "rsum")}
    vs = f"{m['rsum'] - direct_rsum:+.1f}" if direct_rsum is not None else ""
    spread = "" if spread == "—" else spread
    return (f"| {label} | {n} | {m['i2t_R@1']:.1f} | {m['i2t_R@5']:.1f} | {m['i2t_R@10']:.1f} | {m['t2i_R@1']:.1f} "
            f"| {m['t2i_R@5']:.1f} | {m['t2i_R@10']:.1f} | {m['rsum']:.1f}{spread} | "
            f"{100 * m['rsum'] / teacher_rsum:.1f}% | {vs} |")


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def chart(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"] for r in records))
    teacher = next(r["teacher"]["rsum"] for r in records if "teacher" in r)
    vals, errs = [], []
    for n in names:
        xs = [r["student"]["rsum"] for r in records if r["variant"] == n and "student" in r] or [0.0]
        vals.append(_mean(xs))
        errs.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)  # sample sd, as in the table
    colours = ["tab:green" if n.startswith("dsmd") else "tab:red" if n.startswith("clip") else "tab:blue"
               for n in names]
    fig, ax = plt.subplots(figsize=(12, 5))
    ax.barh([VARIANTS[n][0] for n in names], vals, xerr=errs, color=colours)
    ax.axvline(teacher, color="black", linestyle="--", label=f"teacher {teacher:.1f}")
    ax.axvline(600, color="grey", linewidth=0.5)
    ax.set(xlabel="test RSUM (max 600); bars: mean ± sample sd over seeds",
           title=f"Same student and budget: {path.parent.name}")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.json")
    p.add_argument("--out", default="bench/results/ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (default: all)")
    p.add_argument("--set", action="append", help="override for every variant, e.g. optim.epochs=1")
    p.add_argument("--tuned-direct", help="best.json of bench/direct_sweep.py: the settings of variant clip-tuned")
    args = p.parse_args()
    os.chdir(ROOT)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    others = other_setups(Path(args.out), args.config, args.set)
    if others:
        sys.exit(f"{args.out} holds runs of another setup ({'; '.join(sorted(others))}); "
                 "give this one its own --out")
    trained = 0
    for seed in args.seeds:
        for name in args.only or VARIANTS:
            r = run_variant(name, seed, args)
            trained += not r.get("reused")
            rsum = r["student"]["rsum"] if "student" in r else float("nan")
            print(f"{name:14s} seed {seed}: test RSUM {rsum:6.1f}  ({r['seconds']:.0f} s)", flush=True)
    # the table covers every finished run of this setup in --out, so seeds can be added later
    records = sorted(kept_records(Path(args.out)).values(),
                     key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    md = table(records) + "\n\n" + comparisons(records)
    header = (f"Command: `.venv/bin/python bench/ablation.py {' '.join(sys.argv[1:])}`; config {args.config} "
              f"{' '.join(args.set or [])}  \n"
              f"Written on {machine_line()}; {trained} run(s) trained by this command, {len(records) - trained} "
              "reused from earlier ones (their own dates and machines, where recorded, are in results.json)\n\n")
    (Path(args.out) / "table.md").write_text(header + md + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps(records, indent=2))
    chart(records, Path(args.out) / "ablation.png")
    print(md)
    print(f"wrote {args.out}/table.md, results.json, ablation.png")


if __name__ == "__main__":
    main()
