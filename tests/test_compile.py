"""`jmtl compile`: ahead-of-time compile checks (8 fake CPU devices; TPU slices as shapes).

Byte counts are checked against hand computations from the config numbers: a BERT-style trunk
with one classification head (parameter count as in tests/test_parallel_bench.py), float32
(4 bytes), AdamW's two moments per parameter.
"""

import dataclasses
import json
import pathlib

import pytest

from jmtl import cli
from jmtl import defaults
from jmtl.bench import compile as compile_lib
from jmtl.config import ConfigError
from jmtl.parallel import mesh as mesh_lib
from jmtl.parallel import sharding as sharding_lib

TINY = pathlib.Path(__file__).parent / "configs" / "tiny_sst2.py"
D, FF, LAYERS, VOCAB, MAX_POS = 32, 64, 1, 256, 16


def _config(**mesh):
  c = defaults.base_config()
  c.tasks = ("sst2",)
  c.model.update(layers=LAYERS, d_model=D, d_ff=FF, heads=2, max_len=MAX_POS)
  c.data.update(batch_size=16, max_len=16, vocab_size=VOCAB)
  c.mesh.update(**mesh)
  return c


def _hand_params(d=D, ff=FF, layers=LAYERS, vocab=VOCAB, max_pos=MAX_POS) -> int:
  """Per layer q,k,v,o (d*d + d each), FFN (d*ff + ff + ff*d + d), two LayerNorms (2d each);
  embedding LayerNorm (2d); pooler (d*d + d) and 2-class classifier (2d + 2); token, position
  and 2 segment embeddings."""
  per_layer = 4 * (d * d + d) + (d * ff + ff + ff * d + d) + 2 * 2 * d
  return layers * per_layer + 2 * d + (d * d + d) + (d * 2 + 2) + (vocab + max_pos + 2) * d


def _fsdp_bytes(n: int, shards: int, d=D, ff=FF, layers=LAYERS) -> int:
  """float32 bytes per device of `n` parameters with the default rules and fsdp = `shards`:
  every parameter with an 'embed' dimension is split `shards` ways; the rest is replicated:
  per layer the q, k, v biases (heads x kv = d each) and the FFN input bias (ff), the pooler
  bias (d, 'mlp') and the classifier bias (2 labels)."""
  replicated = layers * (3 * d + ff) + d + 2
  return 4 * (replicated + (n - replicated) // shards)


def _run(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jmtl", "compile", *argv])
  out = capsys.readouterr()
  return exit_info.value.code, out.out, out.err.strip().splitlines()


def test_tpu_slice_table():
  # Slice names as Cloud TPU gives them: v4 / v5p count TensorCores (2 per chip), v5e / v6e chips.
  want = {"v5e-16": (16, "v5e:4x4", 16), "v4-32": (16, "v4:2x2x4", 32),
          "v5p-8": (4, "v5:2x2x1", 95), "v6e-8": (8, "v6e:2x4", 32)}
  for name, (chips, topo, gib) in want.items():
    t = compile_lib.get_target(name)
    assert (t.num_devices, t.topology, t.memory_bytes) == (chips, topo, gib * 2**30), name
  for bad in ("v5e-17", "v4-3", "tpu9-8", "v5e", "v5e-x"):
    with pytest.raises(ConfigError, match="--topology"):
      compile_lib.get_target(bad)


def test_local_compile_bytes_match_hand_computation():
  c = _config(data=8, fsdp=1, tensor=1)  # parameters replicated on all 8 devices
  r = compile_lib.compile_check(c, compile_lib.get_target("local"))
  json.dumps(r)
  n = _hand_params()
  assert r["params"] == n and r["mesh"] == "8x1x1" and r["sharding_problems"] == []
  assert r["params_bytes_per_device"] == 4 * n
  # AdamW: mu and nu per parameter, plus a few int32 step counts (scalars).
  assert 8 * n <= r["opt_state_bytes_per_device"] <= 8 * n + 64
  assert r["compiled"] and r["fits"] is True and len(r["memory"]) == 1
  m = r["memory"][0]
  # Batch shard per device: 16 rows / 8 = 2 rows of 16 int32 ids, segments and mask, and one
  # float32 weight, int32 index and int32 label per row.
  batch = 2 * (3 * 16 * 4 + 3 * 4)
  state = r["params_bytes_per_device"] + r["opt_state_bytes_per_device"]
  assert state + batch <= m["argument"] <= state + batch + 64  # + step, rng key, two scalars
  assert state <= m["alias"] <= m["argument"]  # the donated state is updated in place
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  assert m["temp"] > 0 and r["total_bytes"] == m["total"] <= r["device_memory_bytes"]


def test_fsdp_divides_parameter_bytes_by_eight():
  vocab = 2048  # the embedding dominates, as in real models
  c = _config(data=1, fsdp=8)
  c.data.vocab_size = vocab
  c2 = _config(data=8, fsdp=1)
  c2.data.vocab_size = vocab
  rep = compile_lib.compile_check(c2, compile_lib.get_target("local"), compile_step=False)
  fsdp = compile_lib.compile_check(c, compile_lib.get_target("local"), compile_step=False)
  assert rep["params_bytes_per_device"] == 4 * _hand_params(vocab=vocab)
  assert fsdp["params_bytes_per_device"] == _fsdp_bytes(_hand_params(vocab=vocab), 8)
  assert fsdp["params_bytes_per_device"] <= rep["params_bytes_per_device"] / 8 * 1.05
  assert fsdp["opt_state_bytes_per_device"] <= rep["opt_state_bytes_per_device"] / 8 * 1.05
  assert fsdp["not_compiled"] == "not asked to compile" and fsdp["fits"] is None


def test_sharding_problems_name_parameter_dimension_and_axes():
  c = _config(data=1, fsdp=1, tensor=8)  # heads=2 and vocab 250 do not split over 8
  c.data.vocab_size = 250
  r = compile_lib.compile_check(c, compile_lib.get_target("local"))
  assert not r["compiled"] and r["not_compiled"] == "sharding rules do not divide"
  text = "\n".join(r["sharding_problems"])
  assert "trunk/token_embedding/embedding: dimension 0 ('vocab', size 250)" in text
  assert "trunk/layers/0/attn/query/kernel: dimension 1 ('heads', size 2)" in text
  assert "('tensor',) of sizes (8,)" in text
  # Only those: q, k, v kernels and biases, the output kernel, the embedding.
  assert len(r["sharding_problems"]) == 8


def test_shape_only_checks_on_an_abstract_mesh_of_a_tpu_slice(monkeypatch):
  monkeypatch.setattr(compile_lib, "tpu_runtime_available", lambda: False)
  c = _config()
  mesh = mesh_lib.abstract_mesh(c.mesh, 16)  # data = -1 takes the 16 devices
  assert dict(mesh.shape) == {"data": 16, "fsdp": 1, "tensor": 1}
  c.mesh.update(data=1, fsdp=16)
  r = compile_lib.compile_check(c, compile_lib.get_target("v4-32"))
  # d_model 32 divides by 16: fsdp shards every 'embed' dimension 16 ways.
  assert r["sharding_problems"] == [] and r["devices"] == 16 and r["mesh"] == "1x16x1"
  assert r["params_bytes_per_device"] == _fsdp_bytes(_hand_params(), 16)
  assert not r["compiled"] and "needs the TPU runtime" in r["not_compiled"]
  c.mesh.update(fsdp=1, tensor=16)  # heads = 2 cannot split 16 ways
  r = compile_lib.compile_check(c, compile_lib.get_target("v4-32"))
  assert any(p.startswith("trunk/layers/0/attn/query/kernel: dimension 1 ('heads', size 2)")
             for p in r["sharding_problems"])
  assert sharding_lib.sharding_problems({}, mesh, c.mesh.rules) == []


def test_cli_compile_local_json(capsys, tmp_path):
  out = tmp_path / "compile.json"
  code, stdout, err = _run(capsys, ["--config", str(TINY), "--json", "--out", str(out)])
  assert code == 0, err
  r = json.loads(stdout)
  assert r == json.loads(out.read_text())
  assert r["compiled"] and r["fits"] and r["topology"] == "local" and r["devices"] == 8


def test_cli_rule_that_does_not_divide_exits_2_naming_it(capsys):
  code, stdout, err = _run(capsys, ["--config", str(TINY), "--config.mesh.tensor=8",
                                    "--config.mesh.data=1"])
  assert code == 2 and len(err) == 1 and err[0].startswith("jmtl: error: --topology local")
  assert "sharding rule(s) do not divide" in err[0]
  assert ("sharding rule does not divide: trunk/layers/0/attn/query/kernel: dimension 1 "
          "('heads', size 2)") in stdout
  assert "not compiled" in stdout


def test_cli_unknown_topology_exits_2_one_line(capsys):
  code, stdout, err = _run(capsys, ["--config", str(TINY), "--topology", "v9x-8"])
  assert code == 2 and stdout == "" and len(err) == 1
  assert err[0].startswith("jmtl: error: --topology: unknown accelerator type 'v9x-8'")


def test_both_spellings_of_v5e_name_one_slice():
  # Google Cloud's pages say v5e-16; gcloud --accelerator-type says v5litepod-16: 16 chips, 4x4.
  for name in ("v5e-16", "v5litepod-16"):
    t = compile_lib.get_target(name)
    assert (t.num_devices, t.topology, t.memory_bytes) == (16, "v5e:4x4", 16 * 2**30), name
  with pytest.raises(ConfigError, match="no such v5e slice"):
    compile_lib.get_target("v5litepod-7")


def test_cli_dcn_data_is_checked_against_the_slice(capsys):
  # 3 does not divide the 16-device data axis; 2 does, but one slice is no multislice.
  code, stdout, err = _run(capsys, ["--config", str(TINY), "--topology", "v5e-16",
                                    "--config.mesh.dcn_data=3"])
  assert code == 2 and stdout == "" and len(err) == 1
  assert "mesh.dcn_data=3 does not divide the data axis size 16" in err[0]
  code, _, err = _run(capsys, ["--config", str(TINY), "--topology", "v5e-16",
                               "--config.mesh.dcn_data=2"])
  assert code == 2 and len(err) == 1 and "is one slice" in err[0]


def test_cli_mesh_that_does_not_fit_the_slice_exits_2(capsys):
  code, _, err = _run(capsys, ["--config", str(TINY), "--topology", "v5p-8",
                               "--config.mesh.data=8"])
  assert code == 2 and len(err) == 1 and "mesh" in err[0] and "4" in err[0]


def test_cli_tpu_slice(capsys):
  """Without libtpu: the shape-only checks, then one line naming the runtime, exit 2.
  With libtpu: XLA's TPU compiler runs here and the step compiles for the slice."""
  code, stdout, err = _run(capsys, ["--config", str(TINY), "--topology", "v5e-16", "--json",
                                    "--config.mesh.data=1", "--config.mesh.fsdp=16"])
  r = json.loads(stdout)
  assert r["devices"] == 16 and r["mesh"] == "1x16x1" and r["sharding_problems"] == []
  assert r["device_memory_bytes"] == 16 * 2**30
  # tiny_sst2: d 32, ff 64, vocab 500, 64 positions; every 'embed' dimension splits 16 ways.
  n = _hand_params(vocab=500, max_pos=64)
  assert r["params"] == n and r["params_bytes_per_device"] == _fsdp_bytes(n, 16)
  if compile_lib.tpu_runtime_available():
    assert code == 0 and r["compiled"] and r["fits"]
  else:
    assert code == 2 and not r["compiled"] and r["fits"] is None
    assert len(err) == 1 and "needs the TPU runtime" in err[0] and "libtpu" in err[0]


@pytest.mark.slow
def test_cli_does_not_fit_exits_1(capsys, monkeypatch):
  small = dataclasses.replace(compile_lib.local_target(), memory_bytes=4096,
                              memory_source="test")
  monkeypatch.setattr(compile_lib, "local_target", lambda: small)
  code, stdout, err = _run(capsys, ["--config", str(TINY)])
  assert code == 1 and "fits: no" in stdout
  assert len(err) == 1 and err[0].startswith("jmtl: error: does not fit:")
  assert "4,096 (test)" in err[0]


# The first line of what XLA:TPU (libtpu 0.0.42.1) raised on this host for a 4-layer, d 1024
# encoder with 2048 x 512 token batches on v5e-16 (data parallel).
TPU_OOM = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
           "of memory in memory space hbm. Used 15.76G of 15.75G hbm. Exceeded hbm capacity by "
           "14.59M.\n\nTotal hbm usage >= 16.01G:\n    reserved        258.01M \n")


def test_out_of_memory_line():
  assert compile_lib.out_of_memory_line(TPU_OOM) == TPU_OOM.splitlines()[0]
  assert compile_lib.out_of_memory_line("INVALID_ARGUMENT: bad sharding") is None
  assert compile_lib.out_of_memory_line("") is None


def test_cli_state_alone_too_big_for_the_slice_exits_1(capsys, monkeypatch):
  monkeypatch.setattr(compile_lib, "tpu_runtime_available", lambda: False)
  tiny_hbm = dataclasses.replace(compile_lib.TPU_GENERATIONS["v5e"], hbm_bytes=1000)
  monkeypatch.setitem(compile_lib.TPU_GENERATIONS, "v5e", tiny_hbm)
  code, stdout, err = _run(capsys, ["--config", str(TINY), "--topology", "v5e-16"])
  assert code == 1 and "fits: no" in stdout
  assert len(err) == 1 and err[0].startswith("jmtl: error: does not fit: parameters and "
                                             "optimizer state alone need")


@pytest.mark.slow
def test_mixed_batch_with_a_seq2seq_task_compiles():
  c = _config(data=8, fsdp=1)
  c.tasks = ("sst2", "dialogsum")
  c.model.decoder.update(layers=1, heads=2, d_ff=64)
  c.data.update(mixing="mixed", mixture="uniform", max_target_len=8)
  r = compile_lib.compile_check(c, compile_lib.get_target("local"))
  # One batch holding both tasks: 16 rows split uniformly, sources at data.max_len = 16,
  # decoder inputs at data.max_target_len = 8.
  assert r["batch_shapes"] == [{"sst2": {"input_ids": [8, 16]},
                                "dialogsum": {"input_ids": [8, 16], "decoder_input_ids": [8, 8]}}]
  assert r["compiled"] and r["fits"] and [m["tasks"] for m in r["memory"]] == ["dialogsum,sst2"]


def test_cli_federated_config_is_refused_in_one_line(capsys):
  fed = pathlib.Path(__file__).resolve().parent / "configs" / "tiny_fed.py"
  code, stdout, err = _run(capsys, ["--config", str(fed)])
  assert code == 2 and stdout == "" and len(err) == 1
  assert "is a federated config (fed.sites)" in err[0]
