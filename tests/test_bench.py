"""The benchmark CLI runs end to end on a tiny shape (numbers are not checked: that is its job)."""
import json

import pytest

from deltajax import bench


def test_bench_runs_and_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--ops", "kda", "--T", "20", "--B", "1", "--H", "1", "--K", "16", "--V", "8",
              "--chunk-size", "16", "--repeats", "1", "--json", str(out)])
  text = capsys.readouterr().out
  assert "kda" in text and "auto ->" in text
  results = json.loads(out.read_text())["results"]
  assert {r["impl"] for r in results} == {"recurrent", "chunk"}
  assert all(r["fwd_bwd_ms"] > 0 and r["peak_mib"] > 0 for r in results)


@pytest.mark.parametrize("argv", [["--ops", "mamba"], ["--impls", "triton"], ["--compare", "x"]])
def test_bench_rejects_bad_arguments(argv):
  with pytest.raises(SystemExit):
    bench.main(argv)


def test_model_flops_counts_householder_steps():
  s = bench.Shape(B=1, T=128, H=2, K=16, V=16, n=3, chunk_size=16)
  assert bench.model_flops("delta_product", s) == 3 * bench.model_flops("delta_rule", s)
