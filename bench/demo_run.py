"""What a `make demo` produced, as a result file: recall, the time of each stage, how far the balancer moved.

Reads the artifacts a `make demo` leaves (the manifests, the student's test recall and its
`steps.jsonl`) and writes them into one small JSON and a table, so the figures the README and
BENCHMARKS.md quote from a demo run have a file behind them.

    make demo && .venv/bin/python bench/demo_run.py             # artifacts/ of this clone
    .venv/bin/python bench/demo_run.py --artifacts /tmp/fresh/artifacts --out bench/results/demo-run

Writes OUT/{results.json,table.md} (default bench/results/demo-run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, machine, machine_line


def balancer_movement(steps: Path, settle: int = 200, tail: int = 50) -> dict:
    """How far the balancer's weights move from equal (1 each): the largest move and where, the mean move
    after the first `settle` steps, and the largest move over the last `tail` steps."""
    rows = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
    moves = [max(abs(w - 1) for w in r["weight"].values()) for r in rows]
    peak = max(range(len(rows)), key=moves.__getitem__)
    later = [abs(w - 1) for r in rows[settle:] for w in r["weight"].values()]
    return {"steps": len(rows), "max_move": round(moves[peak], 4), "max_move_step": rows[peak]["step"],
            "weights_at_max": {k: round(v, 4) for k, v in rows[peak]["weight"].items()},
            f"mean_move_after_step_{settle}": round(sum(later) / len(later), 4) if later else None,
            f"max_move_last_{tail}_steps": round(max(moves[-tail:]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--out", default="bench/results/demo-run")
    a = p.parse_args()
    art = a.artifacts

    def manifest(part: str) -> dict:
        return json.loads((art / part / "manifest.json").read_text())

    recall = json.loads((art / "student" / "test_recall.json").read_text())
    seconds = {"teacher training": manifest("teacher").get("seconds"),
               "feature extraction": manifest("features").get("seconds"),
               "distillation": manifest("student").get("seconds_this_session")}
    result = {"meta": {"command": "bench/demo_run.py " + " ".join(sys.argv[1:]), "machine": machine(),
                       "artifacts": str(art)},
              "test_recall": recall, "seconds": seconds,
              "balancer": balancer_movement(art / "student" / "steps.jsonl")}
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    b = result["balancer"]
    rsum = {name: r.get("rsum") for name, r in recall.items() if isinstance(r, dict)}
    lines = [f"Command: `.venv/bin/python bench/demo_run.py {' '.join(sys.argv[1:])}`; {machine_line()}.", "",
             "| stage | seconds |", "|---|---:|", *[f"| {k} | {v:.1f} |" for k, v in seconds.items() if v], "",
             "Test RSUM: " + ", ".join(f"{k} {v:.1f}" for k, v in rsum.items() if v is not None), "",
             f"Balancer weights over {b['steps']} steps: at most {b['max_move']:.3f} from equal (step "
             f"{b['max_move_step']}: {b['weights_at_max']}), {b['mean_move_after_step_200']:.4f} on average after "
             f"step 200, at most {b['max_move_last_50_steps']:.3f} over the last 50 steps."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
