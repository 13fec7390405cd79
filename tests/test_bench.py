"""The benchmark CLI runs end to end on a tiny shape (numbers are not checked: that is its job)."""
import json

import pytest

from deltajax import bench


def test_bench_runs_and_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--ops", "kda", "--T", "20", "--B", "1", "--H", "1", "--K", "16", "--V", "8",
              "--chunk-size", "16", "--repeats", "1", "--gate-scale", "2", "--json", str(out)])
  text = capsys.readouterr().out
  assert "kda" in text and "auto ->" in text
  results = json.loads(out.read_text())["results"]
  assert {r["impl"] for r in results} == {"recurrent", "chunk"}
  assert all(r["fwd_bwd_ms"] > 0 and r["peak_mib"] > 0 for r in results)
  assert "gate scale 2" in text


def test_gate_scale_scales_the_gates():
  s = bench.Shape(B=1, T=8, H=1, K=4, V=4)
  g1 = bench.make_args("kda", s, "float32")[3]
  g3 = bench.make_args("kda", bench.Shape(B=1, T=8, H=1, K=4, V=4, gate_scale=3.0), "float32")[3]
  assert (g1 < 0).all() and abs(g3 - 3 * g1).max() < 1e-6


@pytest.mark.parametrize("argv, message", [
    (["--ops", "mamba"], "--ops"), (["--impls", "triton"], "--impls"),
    (["--compare", "x"], "--compare"), (["--gate-scale", "-1"], "--gate-scale")])
def test_bench_rejects_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit):
    bench.main(argv)
  assert message in capsys.readouterr().err


def test_model_flops_counts_householder_steps():
  s = bench.Shape(B=1, T=128, H=2, K=16, V=16, n=3, chunk_size=16)
  assert bench.model_flops("delta_product", s) == 3 * bench.model_flops("delta_rule", s)
