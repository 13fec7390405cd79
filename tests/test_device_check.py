"""The device check's plumbing on CPU (it runs for real only on a GPU): stages, the table,
the JSON and the verdict that `impl="auto"` on GPU waits for."""
from __future__ import annotations

import json

import pytest

from deltajax import device_check


def test_timings_table_json_and_verdict(tmp_path):
  out = tmp_path / "check.json"
  lines = []
  report = device_check.run(str(out), budget_s=600, log=lines.append, repeats=1,
                            impls=("chunk",), cases=(), ops=("delta_rule",),
                            shapes=(dict(B=1, T=64, H=1, K=16, V=16),))
  assert json.loads(out.read_text())["timings"] == json.loads(json.dumps(report["timings"]))
  assert [(r["op"], r["impl"]) for r in report["timings"]] == [("delta_rule", "chunk")]
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in report["timings"])
  assert any("fwd+bwd" in line for line in lines)
  # No checks ran and nothing was compared with the kernels: auto must not pick them.
  assert not report["verdict"]["auto_may_pick_pallas"]


def test_verdict_needs_every_check_and_a_speedup():
  t = lambda impl, ms: dict(op="kda", impl=impl, B=1, T=8192, fwd_bwd_ms=ms)
  ok = [dict(ok=True)]
  assert device_check.verdict(ok, [t("pallas", 1.0), t("chunk", 3.0)])["auto_may_pick_pallas"]
  assert not device_check.verdict(ok, [t("pallas", 4.0), t("chunk", 3.0)])[
      "auto_may_pick_pallas"]
  assert not device_check.verdict(ok + [dict(ok=False)], [t("pallas", 1.0), t("chunk", 3.0)])[
      "auto_may_pick_pallas"]
  v = device_check.verdict(ok, [t("pallas", 1.0), t("chunk", 3.0), t("fla", 2.0)])
  assert v["speedup_vs_fla"] == {"kda B=1 T=8192": 2.0}


def test_needs_a_gpu():
  with pytest.raises(SystemExit, match="needs a CUDA GPU"):
    device_check.main(None, 10)
