"""TFDS source: build a tiny array_record dataset locally (no download) and read it back."""

import numpy as np
import pytest
from ml_collections import ConfigDict

tfds = pytest.importorskip("tensorflow_datasets")

from jmtl.data import sources  # noqa: E402
from jmtl.tasks import Task, TfdsSource  # noqa: E402

_ROWS = {"train": [("a good film", 1), ("a bad film", 0), ("fine", 1)],
         "validation": [("caf\u00e9 noir", 0), ("ok", 1)]}


class JmtlTinyGlue(tfds.core.GeneratorBasedBuilder):
  """A GLUE-shaped dataset with one config, read as `jmtl_tiny_glue/sst2`."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="sst2")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=["negative", "positive"]),
        "idx": np.int32}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in _ROWS}

  def _generate_examples(self, split):
    for i, (text, label) in enumerate(_ROWS[split]):
      yield i, {"sentence": text, "label": label, "idx": i}


def _task(fields=None):
  fields = fields or {"text_a": "sentence", "label": "label"}
  return Task("tiny", "classification", 2, ("accuracy",),
              splits={"train": TfdsSource("jmtl_tiny_glue/sst2", "train", fields, id="idx")},
              tfds={s: TfdsSource("jmtl_tiny_glue/sst2", s, fields, id="idx") for s in _ROWS})


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  builder = JmtlTinyGlue(config="sst2", data_dir=str(root), file_format="array_record")
  builder.download_and_prepare()
  return root


def test_round_trip(tfds_dir):
  cfg = ConfigDict({"dir": "", "tfds_dir": str(tfds_dir), "split_seed": 0,
                    "max_train_examples": 0, "max_eval_examples": 0, "bad_rows": "error"})
  assert sources.check_task_files(_task(), cfg) == []
  for split, rows in _ROWS.items():
    recs = sorted(sources.load_records(_task(), split, cfg), key=lambda r: int(r["id"]))
    assert recs == [{"id": str(i), "text_a": t, "text_b": None, "label": y}
                    for i, (t, y) in enumerate(rows)]


def test_missing_dataset_and_feature(tfds_dir, tmp_path):
  cfg = ConfigDict({"dir": "", "tfds_dir": str(tmp_path), "split_seed": 0,
                    "max_train_examples": 0, "max_eval_examples": 0, "bad_rows": "error"})
  assert sources.check_task_files(_task(), cfg, ["train"]) == [
      str(tmp_path / "jmtl_tiny_glue" / "sst2")]
  with pytest.raises(FileNotFoundError, match="never attempted"):
    sources.load_records(_task(), "train", cfg)
  cfg.tfds_dir = str(tfds_dir)
  with pytest.raises(KeyError, match="no feature 'sentence1'"):
    sources.load_records(_task({"text_a": "sentence1", "label": "label"}), "train", cfg)
