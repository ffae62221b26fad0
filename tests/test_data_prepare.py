"""`jmtl data prepare`: a real TFDS preparation from the local GLUE files, read back through
jmtl's TFDS source, and one line with exit 1 or 2 for each way it can fail.

No network here. TFDS takes each file of a dataset from the manual dir when its name and
checksum are the registered ones, else from its download cache, else from the URL. We cannot
make byte-identical originals, so `_seed_cache` puts files built from the local GLUE TSVs into
TFDS's download cache (the layout a finished download leaves: `<download_dir>/glue/<file name
from URL and registered sha256>` and its `.INFO`), which TFDS trusts as it would an earlier
download. Everything after that (the GLUE builder, the array_record writer, the read back) is
TFDS's and jmtl's real code. Expected counts come from the TSVs, read here with `csv`.
"""

import csv
import importlib.util
import io
import json
import pathlib
import zipfile

import pytest
from ml_collections import ConfigDict

tfds = pytest.importorskip("tensorflow_datasets")

from tensorflow_datasets.core.download import checksums as tfds_checksums  # noqa: E402
from tensorflow_datasets.core.download import resource as tfds_resource  # noqa: E402

from jmtl import cli  # noqa: E402
from jmtl.data import prepare, sources  # noqa: E402
from jmtl.tasks import Task, TfdsSource, get_task  # noqa: E402
from jmtl.tasks import base as tasks_base  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"
# The URLs of TFDS 4.9's GLUE builder (tensorflow_datasets/text/glue.py).
MRPC_TRAIN = "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"
MRPC_TEST = "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt"
MRPC_DEV_IDS = ("https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations."
                "appspot.com/o/data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-"
                "7480817f1adc")
WNLI_ZIP = "https://dl.fbaipublicfiles.com/glue/data/WNLI.zip"


def _rows(path: pathlib.Path) -> list[list[str]]:
  """Data rows of a GLUE TSV (header dropped), as GLUE's own readers split them."""
  with open(path, encoding="utf-8-sig", newline="") as f:
    return [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]


def _seed_cache(download_dir: pathlib.Path, files: dict[str, bytes]) -> None:
  """Writes {url: content} where a finished TFDS download of `url` would be."""
  infos = tfds_checksums.get_all_url_infos()
  folder = download_dir / "glue"
  folder.mkdir(parents=True, exist_ok=True)
  for url, content in files.items():
    path = folder / tfds_resource.get_dl_fname(url, infos[url].checksum)
    path.write_bytes(content)
    (folder / (path.name + ".INFO")).write_text(json.dumps({"urls": [url]}))


def _mrpc_files(glue: pathlib.Path) -> dict[str, bytes]:
  """The three senteval/GLUE files of TFDS's MRPC builder, rebuilt from GLUE's MRPC TSVs:
  msr_paraphrase_train.txt = train rows then dev rows (one header, UTF-8 BOM first, as the
  original), the dev id pairs, and the test file."""
  train = (glue / "train.tsv").read_bytes().rstrip(b"\n") + b"\n"
  dev_rows = (glue / "dev.tsv").read_bytes().split(b"\n", 1)[1]
  ids = "".join(f"{r[1]}\t{r[2]}\n" for r in _rows(glue / "dev.tsv"))
  return {MRPC_TRAIN: train + dev_rows, MRPC_DEV_IDS: ids.encode(),
          MRPC_TEST: (glue / "test.tsv").read_bytes()}


def _zip(glue: pathlib.Path, folder: str) -> bytes:
  """GLUE's archive layout: <folder>/{train,dev,test}.tsv."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
      z.write(glue / name, f"{folder}/{name}")
  return buf.getvalue()


def _cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jmtl", *argv])
  out, err = capsys.readouterr()
  return exit_info.value.code, out.strip().splitlines(), err.strip().splitlines()


def _dirs(tmp_path: pathlib.Path) -> list[str]:
  return [f"--config.data.tfds_dir={tmp_path / 'tfds'}",
          f"--config.data.tfds_download_dir={tmp_path / 'downloads'}",
          f"--config.data.tfds_manual_dir={tmp_path / 'manual'}"]


def _one_error(code: int, out: list[str], err: list[str], want_code: int) -> str:
  assert code == want_code, (out, err)
  assert len(err) == 1, err
  assert err[0].startswith("jmtl: error: ") and "Traceback" not in err[0]
  return err[0]


def test_prepare_mrpc_from_local_files_then_read_back(data_dir, tmp_path, capsys):
  glue = data_dir / "glue" / "MRPC"
  _seed_cache(tmp_path / "downloads", _mrpc_files(glue))
  train, dev, test = (_rows(glue / f) for f in ("train.tsv", "dev.tsv", "test.tsv"))
  assert (len(train), len(dev), len(test)) == (3668, 408, 1725)  # GLUE's published sizes

  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY),
                        "--config.tasks=mrpc,dialogsum", *_dirs(tmp_path))
  assert code == 0, err
  where = tmp_path / "tfds" / "glue" / "mrpc" / "2.0.0"
  assert out == [
      f"mrpc: glue/mrpc 2.0.0 prepared in {where}: train {len(train)}, validation {len(dev)}, "
      f"test {len(test)}",
      f"dialogsum: no TFDS name; reads its files from data.dir ({data_dir}), nothing to prepare"]

  # Read back through jmtl's normal TFDS source: the same sentence pairs and labels as the TSVs
  # (GLUE columns: Quality, #1 ID, #2 ID, #1 String, #2 String; test: index, ids, strings).
  cfg = ConfigDict({"dir": "", "tfds_dir": str(tmp_path / "tfds"), "split_seed": 0,
                    "max_train_examples": 0, "max_eval_examples": 0, "bad_rows": "error"})
  task = get_task("mrpc")
  for split, rows in (("train", train), ("validation", dev)):
    got = sorted((r["text_a"], r["text_b"], r["label"])
                 for r in sources.load_records(task, split, cfg))
    assert got == sorted((r[3], r[4], int(r[0])) for r in rows)
  got = sorted((r["text_a"], r["text_b"], r["label"]) for r in sources.load_records(task, "test",
                                                                                     cfg))
  assert got == sorted((r[3], r[4], -1) for r in test)

  # `jmtl data` now counts the TFDS splits; a second prepare finds the dataset ready.
  code, out, err = _cli(capsys, "data", "--config", str(TINY), "--config.tasks=mrpc",
                        f"--config.data.tfds_dir={tmp_path / 'tfds'}",
                        "--config.data.max_train_examples=0", "--config.data.max_eval_examples=0")
  assert code == 0, err
  assert out[0] == f"mrpc (classification): train {len(train)}, validation {len(dev)}, " \
                   f"test {len(test)}"
  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY), "--config.tasks=mrpc",
                        *_dirs(tmp_path))
  assert code == 0 and out == [f"mrpc: glue/mrpc 2.0.0 already prepared in {where}: train "
                               f"{len(train)}, validation {len(dev)}, test {len(test)}"]


SQUAD_TRAIN = "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json"


def test_prepare_squad_dev_from_the_manual_dir(data_dir, tmp_path, capsys):
  """The manual dir as a user fills it: dev-v1.1.json is the original (its sha256 matches TFDS's
  registered one), so TFDS verifies and uses it. train-v1.1.json is not at hand: the download
  cache gets a stand-in holding the first dev article, so that TFDS can build its train split."""
  dev_file = data_dir / "squad" / "dev-v1.1.json"
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "dev-v1.1.json").write_bytes(dev_file.read_bytes())
  dev = json.loads(dev_file.read_text(encoding="utf-8"))["data"]
  stand_in = {"version": "1.1", "data": dev[:1]}
  infos = tfds_checksums.get_all_url_infos()
  folder = tmp_path / "downloads" / "squad"
  folder.mkdir(parents=True)
  path = folder / tfds_resource.get_dl_fname(SQUAD_TRAIN, infos[SQUAD_TRAIN].checksum)
  path.write_text(json.dumps(stand_in))
  (folder / (path.name + ".INFO")).write_text(json.dumps({"urls": [SQUAD_TRAIN]}))

  def questions(articles):
    return [(qa["id"], qa["question"], sorted(a["text"] for a in qa["answers"]))
            for art in articles for para in art["paragraphs"] for qa in para["qas"]]

  want_dev, want_train = questions(dev), questions(dev[:1])
  assert len(want_dev) == 10570  # SQuAD v1.1 dev, published size
  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY),
                        "--config.tasks=squad_dev", "--config.data.doc_stride=16",
                        *_dirs(tmp_path))
  assert code == 0, err
  where = tmp_path / "tfds" / "squad" / "v1.1" / "3.0.0"
  assert out == [f"squad_dev: squad/v1.1 3.0.0 prepared in {where}: train {len(want_train)}, "
                 f"validation {len(want_dev)}"]
  cfg = ConfigDict({"dir": "", "tfds_dir": str(tmp_path / "tfds"), "split_seed": 0,
                    "max_train_examples": 0, "max_eval_examples": 0, "bad_rows": "error"})
  got = sources.load_records(get_task("squad_dev"), "validation", cfg)
  assert sorted((r["id"], r["question"], sorted(r["answers"]["text"])) for r in got) == \
      sorted(want_dev)
  first = next(r for r in got if r["id"] == want_dev[0][0])
  art = dev[0]["paragraphs"][0]
  assert (first["context"], first["title"]) == (art["context"], dev[0]["title"])
  assert first["answers"]["answer_start"] == [a["answer_start"] for a in art["qas"][0]["answers"]]


def test_tfds_names_match_the_builders_features(tmp_path):
  """Every TFDS feature a task reads is declared by that TFDS builder (no data needed)."""
  for task in sorted(tasks_base.TASKS.values(), key=lambda t: t.name):
    for spec in (task.tfds or {}).values():
      info = prepare.builder_of(spec.name, str(tmp_path)).info
      wanted = set(spec.fields.values()) | ({spec.id} if spec.id else set())
      assert wanted <= set(info.features.keys()), (task.name, spec.name, sorted(info.features))


def test_tfds_only_split_without_tfds_dir(capsys):
  code, out, err = _cli(capsys, "train", "--config", str(TINY), "--workdir", "/nonexistent/w",
                        "--config.tasks=cnn_dailymail")
  line = _one_error(code, out, err, 2)
  assert "task 'cnn_dailymail'" in line and "set data.tfds_dir and run jmtl data prepare" in line


def test_manual_file_that_is_not_the_original_is_refused(data_dir, tmp_path, capsys):
  # WNLI.zip made from the local TSVs: right name, not the registered sha256 -> exit 2.
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "WNLI.zip").write_bytes(_zip(data_dir / "glue" / "WNLI", "WNLI"))
  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY), "--config.tasks=wnli",
                        *_dirs(tmp_path))
  line = _one_error(code, out, err, 2)
  assert "task 'wnli': TFDS glue/wnli:" in line and "wrong checksum" in line
  assert "data.tfds_manual_dir" in line
  assert not (tmp_path / "tfds" / "glue" / "wnli").exists() or not list(
      (tmp_path / "tfds" / "glue" / "wnli").glob("*/dataset_info.json"))


def test_archive_dataset_needs_tensorflow_to_extract(data_dir, tmp_path, capsys):
  glue = data_dir / "glue" / "WNLI"
  _seed_cache(tmp_path / "downloads", {WNLI_ZIP: _zip(glue, "WNLI")})
  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY), "--config.tasks=wnli",
                        *_dirs(tmp_path))
  counts = [len(_rows(glue / f)) for f in ("train.tsv", "dev.tsv", "test.tsv")]
  if importlib.util.find_spec("tensorflow") is None:
    line = _one_error(code, out, err, 1)
    assert "task 'wnli': TFDS glue/wnli:" in line and "pip install tensorflow-cpu" in line
  else:  # TFDS extracts the archive itself
    assert code == 0, err
    assert out[0].endswith(f"train {counts[0]}, validation {counts[1]}, test {counts[2]}")


def test_tfds_dir_must_be_set(capsys):
  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY), "--config.tasks=sst2")
  line = _one_error(code, out, err, 2)
  assert "config key 'data.tfds_dir' is empty" in line and "sst2" in line


def test_unknown_subcommand(capsys):
  code, out, err = _cli(capsys, "data", "prep", "--config", str(TINY))
  assert "unknown subcommand 'prep'" in _one_error(code, out, err, 2)


def test_dataset_unknown_to_tfds_is_an_environment_error(tmp_path):
  task = Task("jmtl_test_no_tfds_dataset", "classification", 2, ("accuracy",),
              splits={"train": TfdsSource("jmtl_no_such_dataset/x", "train", {})},
              tfds={"train": TfdsSource("jmtl_no_such_dataset/x", "train", {})})
  tasks_base.register(task, overwrite=True)
  try:
    cfg = ConfigDict({"tasks": (task.name,), "data": {
        "dir": "", "tfds_dir": str(tmp_path), "tfds_download_dir": "", "tfds_manual_dir": ""}})
    with pytest.raises(prepare.PrepareError, match="has no dataset 'jmtl_no_such_dataset/x'"):
      prepare.prepare(cfg, echo=lambda s: None)
  finally:
    del tasks_base.TASKS[task.name]


def test_failures_are_classified():
  """No network here, but TFDS retries for minutes; the classification is checked on the
  exceptions TFDS's downloader and extractor raise (requests, ModuleNotFoundError)."""
  requests = pytest.importorskip("requests")
  try:
    raise requests.exceptions.ConnectionError("Failed to resolve 'dl.fbaipublicfiles.com'")
  except requests.exceptions.ConnectionError as e:
    err = prepare.failure("rte", "glue/rte", e)
  assert isinstance(err, prepare.PrepareError)
  assert str(err).startswith("task 'rte': TFDS glue/rte: a download from "
                             "dl.fbaipublicfiles.com failed, no network? "
                             "(ConnectionError: Failed to resolve")
  assert "data.tfds_manual_dir" in str(err)
  try:
    try:
      raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    except ModuleNotFoundError as e:
      raise RuntimeError("Error while extracting x.zip") from e
  except RuntimeError as e:
    err = prepare.failure("rte", "glue/rte", e)
  assert isinstance(err, prepare.PrepareError) and "pip install tensorflow-cpu" in str(err)
  disk = OSError(28, "No space left on device", "/tfds/x")
  assert prepare.failure("rte", "glue/rte", disk) is disk  # the CLI names the path, exit 1
  manual = AssertionError("Manual directory /m does not exist or is empty. Create it ...")
  err = prepare.failure("x", "some/ds", manual)
  assert isinstance(err, cli.ConfigError) and "data.tfds_manual_dir" in str(err)


_NO_GCS = importlib.util.find_spec("gcsfs") is None and importlib.util.find_spec(
    "tensorflow") is None


@pytest.mark.skipif(not _NO_GCS, reason="a gs:// filesystem is installed here")
@pytest.mark.parametrize("argv, key", [
    (["data", "prepare", "--config.tasks=sst2", "--config.data.tfds_dir=gs://jmtl-x/tfds"],
     "data.tfds_dir"),
    (["data", "--config.data.dir=gs://jmtl-x/data"], "data.dir"),
    (["data", "--config.data.tfds_dir=gs://jmtl-x/tfds"], "data.tfds_dir"),
    (["data", "--config.data.tokenizer=gs://jmtl-x/tokenizer.json"], "data.tokenizer"),
])
def test_bucket_path_without_its_filesystem_names_key_and_package(capsys, argv, key):
  code, out, err = _cli(capsys, argv[0], *argv[1:-1], "--config", str(TINY), argv[-1])
  line = _one_error(code, out, err, 2)
  assert f"config key '{key}' = gs://jmtl-x/" in line
  assert "cannot access it (ImportError: Please install gcsfs" in line


# ------------------------------------------------------------------ review fixes (issue 13)
def test_unusable_tfds_dir_is_one_line_naming_the_key(capsys):
  code, out, err = _cli(capsys, "data", "prepare", "--config", str(TINY), "--config.tasks=sst2",
                        "--config.data.tfds_dir=/proc/nope")
  line = _one_error(code, out, err, 2)
  assert "config key 'data.tfds_dir' = '/proc/nope': cannot create it" in line


def test_long_download_error_keeps_host_and_manual_dir_advice():
  requests = pytest.importorskip("requests")
  text = ("HTTPSConnectionPool(host='dl.fbaipublicfiles.com', port=443): Max retries exceeded "
          "with url: /glue/data/SST-2.zip " + "x" * 1000 + " (Caused by NameResolutionError)")
  err = prepare.failure("sst2", "glue/sst2", requests.exceptions.ConnectionError(text))
  msg = str(err)
  assert "a download from dl.fbaipublicfiles.com failed" in msg and " ... " in msg
  assert "(Caused by NameResolutionError)" in msg  # the end of the cause is kept
  assert msg.endswith("into data.tfds_manual_dir") and len(msg) < 600


def test_failed_preparation_removes_partial_downloads_and_empty_dataset_dirs(tmp_path,
                                                                             monkeypatch):
  """A builder standing in for TFDS's: it leaves what an interrupted download leaves (a
  `*.tmp.*` folder with a partial file, the dataset's empty version folders), then fails."""
  requests = pytest.importorskip("requests")
  tfds_dir, downloads = tmp_path / "tfds", tmp_path / "downloads"
  (tfds_dir / "glue" / "cola").mkdir(parents=True)  # an earlier dataset: must stay
  (tfds_dir / "glue" / "cola" / "keep.txt").write_text("x")
  (downloads / "old.zip").parent.mkdir(parents=True)
  (downloads / "old.zip").write_text("cached")

  class Builder:
    def is_prepared(self):
      return False

    def download_and_prepare(self, **_):
      part = downloads / "dl.fbaipublicfiles.com_SST-2.zip.tmp.0123abcd"
      part.mkdir()
      (part / "SST-2.zip").write_bytes(b"partial")
      (tfds_dir / "glue" / "sst2" / "2.0.0").mkdir(parents=True)
      raise requests.exceptions.ConnectionError("Failed to resolve 'dl.fbaipublicfiles.com'")

  monkeypatch.setattr(prepare, "builder_of", lambda name, data_dir: Builder())
  cfg = ConfigDict({"tasks": ("sst2",), "data": {
      "dir": "", "tfds_dir": str(tfds_dir), "tfds_download_dir": str(downloads),
      "tfds_manual_dir": ""}})
  with pytest.raises(prepare.PrepareError, match="a download from dl.fbaipublicfiles.com"):
    prepare.prepare(cfg, echo=lambda s: None)
  left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
  assert left == ["downloads", "downloads/old.zip", "tfds", "tfds/glue", "tfds/glue/cola",
                  "tfds/glue/cola/keep.txt"]


def test_training_checks_do_not_block_prepare():
  from jmtl import preflight
  from jmtl.config import ConfigError, load_config_file
  c = load_config_file(TINY)
  c.tasks = ("squad",)
  c.data.max_len = 32
  c.data.doc_stride = 64  # a SQuAD-window rule of training, not of preparing
  c.optim.name = "no_such_optimizer"
  assert preflight.run(c, "prepare", None).data.doc_stride == 64
  with pytest.raises(ConfigError, match="data.doc_stride"):
    preflight.run(c, "train", None)
