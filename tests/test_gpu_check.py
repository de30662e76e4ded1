"""scripts/gpu_check.sh runs its whole path on CPU with a tiny model (--device cpu --quick), as CI runs it:
every section reports, the ZeRO-2 and ZeRO-3 runs train, and the table names each figure."""

import json
import subprocess
from pathlib import Path

from .tiny_runs import ENV

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)],
                         cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert set(results["bench"]["train_sdpa"]["train"]) >= {"causal"}
    assert results["bench"]["sampling"]["sampling"]
    runs = {r["name"]: r for r in results["train_runs"]}
    assert set(runs) == {"zero2", "zero3"}
    for name, report in runs.items():
        assert "error" not in report, report.get("error")
        assert report["steps"] == 3 and report["tokens_per_s"] > 0 and report["plan_bytes"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "adapt train zero3" in table and "sampling" in table and "x causal" in table
