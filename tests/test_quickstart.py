"""The quickstart chain end to end (shortened by overrides): three runs, export, bench, summary."""
from __future__ import annotations

import json

from rich.console import Console

from kd2deploy.quickstart import run_quickstart


def test_quickstart_chain_runs_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    summary = run_quickstart(out, Console(width=200), overrides=["optim.epochs=1", "data.train_subset=256",
                                                                  "data.num_workers=0"])
    for run in ("teacher", "baseline", "kd"):
        assert (out / run / "student.pt").is_file()
        assert 0 <= summary["val_top1"][run] <= 100
    assert summary["kd_gain_points"] == summary["val_top1"]["kd"] - summary["val_top1"]["baseline"]
    manifest = json.loads((out / "kd" / "export" / "manifest.json").read_text())
    assert {a["precision"] for a in manifest["artifacts"]} >= {"fp32", "int8"}
    rows = summary["bench"]
    assert {(r["precision"], r["batch"]) for r in rows} >= {("fp32", 1), ("fp32", 32), ("int8", 1), ("int8", 32)}
    assert json.loads((out / "summary.json").read_text())["val_top1"] == summary["val_top1"]
