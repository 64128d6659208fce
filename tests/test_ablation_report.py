"""The ablation benchmark's report: the verdict per variant, and which earlier runs it reuses."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from ablation import comparisons, kept_records, other_setups


def _record(variant: str, seed: int, rsum: float, **extra) -> dict:
    return {"variant": variant, "seed": seed, "student": {"rsum": rsum}, **extra}


def test_a_difference_counts_only_outside_the_sum_of_the_two_seed_sds():
    records = ([_record("dsmd", s, x) for s, x in enumerate([390.0, 400.0, 410.0])]  # sd 10
               + [_record("bal-none", s, x) for s, x in enumerate([330.0, 335.0, 340.0])]  # sd 5, -65
               + [_record("no-fd", s, x) for s, x in enumerate([380.0, 395.0, 410.0])]  # sd 15, -5
               + [_record("no-hnd", s, x) for s, x in enumerate([430.0, 440.0, 450.0])]  # sd 10, +40
               + [_record("margin-0", 0, 270.0)])
    lines = {line.split(":")[0].lstrip("- "): line for line in comparisons(records).splitlines()}
    assert "-65.0 (sds sum to 15.0), outside the seed spread: worse than DSMD" in lines["balancer none (plain sum)"]
    assert "-5.0 (sds sum to 25.0), inside the seed spread" in lines["w/o FD"]
    assert "+40.0 (sds sum to 20.0), outside the seed spread: better than DSMD" in lines["w/o HND"]
    assert "one seed only" in lines["paper's margin 0"]
    assert comparisons(records[:3]) == ""  # DSMD alone: nothing to compare


def test_finished_runs_are_reused_from_results_json_and_run_folders_but_failed_ones_are_not(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([_record("dsmd", 0, 400.0), _record("clip", 0, 200.0),
                                                       {"variant": "no-cd", "seed": 0, "error": "killed"}]))
    (tmp_path / "clip-s0").mkdir()
    (tmp_path / "clip-s0" / "test_recall.json").write_text(json.dumps(_record("clip", 0, 210.0)))
    kept = kept_records(tmp_path)
    assert kept[("dsmd", 0)]["student"]["rsum"] == 400.0
    assert kept[("clip", 0)]["student"]["rsum"] == 210.0  # a run folder wins over the kept copy
    assert set(kept) == {("dsmd", 0), ("clip", 0)}  # the failed no-cd run is trained again


def test_runs_of_another_setup_are_named_and_the_thread_count_does_not_count(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([
        _record("dsmd", 0, 400.0),  # an older record without a setup: the default config
        _record("no-cd", 1, 380.0, config="configs/demo.json",
                settings=['loss.use=["fd","sd","hnd"]', "run.seed=1", "run.threads=1"])]))
    assert other_setups(tmp_path, "configs/demo.json", None) == set()
    assert other_setups(tmp_path, "configs/demo.json", ["run.threads=2"]) == set()
    assert other_setups(tmp_path, "configs/demo.json", ["optim.epochs=1"]) == {"configs/demo.json"}
    assert other_setups(tmp_path, "configs/demo-long.json", None) == {"configs/demo.json"}
