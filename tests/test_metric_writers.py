"""The metric writer's two files read back (the TensorBoard events through their own framing and
CRCs), what resuming and a torn line do to them, that it brings in neither TensorFlow nor torch,
and the scalars of an evaluation."""
import json
import math
import os
import pathlib
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from uad_jax.evaluation import protocols, report
from uad_jax.evaluation.protocols import ARROW, RetrievalSide
from uad_jax.training import metric_writers
from uad_jax.training.metric_writers import MetricWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected 0x82F63B78) bit by bit, as TFRecord framing uses it."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
  """Every Event of a TFRecord file: u64 length, masked CRC of it, payload, masked CRC of it (all
  little-endian); a CRC mismatch fails."""
  _, event_pb2, _ = metric_writers._tensorboardx()
  data, position, events = pathlib.Path(path).read_bytes(), 0, []
  while position < len(data):
    header = data[position:position + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[position + 8:position + 12])
    payload = data[position + 12:position + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[position + 12 + length:position + 16 + length])
    assert (header_crc, payload_crc) == (masked(crc32c(header)), masked(crc32c(payload)))
    events.append(event_pb2.Event.FromString(payload))
    position += 16 + length
  return events


def scalars_of(events):
  return {(value.tag, event.step): value.simple_value
          for event in events if event.HasField("summary") for value in event.summary.value}


def event_files(workdir):
  return sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*"))


def read_jsonl(workdir):
  with open(pathlib.Path(workdir) / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_the_crc_is_crc32c():
  assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_scalars_read_back_from_both_files(tmp_path):
  records = {10: {"loss/total": 7.25, "lr/weight": np.float32(1e-3), "grad_norm": jnp.array(2.5),
                  "images_per_s": 1610.4},
             20: {"loss/total": 6.5, "lr/weight": 2e-3, "grad_norm": 1.75, "images_per_s": 1700},
             25: {"eval/as_reid/mAP": 0.4321}}
  with MetricWriter(str(tmp_path)) as writer:
    for step, scalars in records.items():
      writer.write_scalars(step, scalars)
    writer.write_scalars(30, {})  # nothing to write: no line, no event

  assert read_jsonl(tmp_path) == [{"step": step, **{k: float(v) for k, v in scalars.items()}}
                                  for step, scalars in records.items()]
  [path] = event_files(tmp_path)
  events = read_events(path)
  assert events[0].file_version == "brain.Event:2"
  assert scalars_of(events) == {(tag, step): float(np.float32(value))
                                for step, scalars in records.items()
                                for tag, value in scalars.items()}


def test_non_finite_values_are_null_in_json_and_kept_in_tensorboard(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"nan": math.nan, "inf": math.inf, "neg": -math.inf, "ok": 1.0})
  assert read_jsonl(tmp_path) == [{"step": 1, "nan": None, "inf": None, "neg": None, "ok": 1.0}]
  got = scalars_of(read_events(event_files(tmp_path)[0]))
  assert math.isnan(got["nan", 1]) and got["inf", 1] == math.inf and got["neg", 1] == -math.inf


def test_each_record_is_on_disk_when_write_scalars_returns(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write_scalars(3, {"a": 1.0})
  # Read while the writer is open, as TensorBoard and a killed run's successor do.
  assert read_jsonl(tmp_path) == [{"step": 3, "a": 1.0}]
  assert scalars_of(read_events(event_files(tmp_path)[0])) == {("a", 3): 1.0}
  writer.close()
  writer.close()  # a second close is harmless
  with pytest.raises(ValueError, match="closed"):
    writer.write_scalars(4, {"a": 1.0})


def test_a_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricWriter(str(workdir), enabled=False, resume_step=5) as writer:
    writer.write_scalars(1, {"a": 1.0})
    writer.flush()
  assert not workdir.exists()


def test_bad_scalars_are_refused(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="shape"):
      writer.write_scalars(1, {"a": np.ones(2)})
    with pytest.raises(ValueError, match="step"):
      writer.write_scalars(1, {"step": 1.0})
  assert not (tmp_path / "metrics.jsonl").read_text()


def test_resume_drops_the_later_records_and_keeps_the_earlier_exactly(tmp_path):
  with MetricWriter(str(tmp_path), resume_step=0) as writer:
    for step in (10, 20, 30, 40):
      writer.write_scalars(step, {"loss/total": 1.0 / step, "lr/weight": step * 1e-4})
    writer.write_scalars(20, {"eval/as_reid/mAP": 0.125})  # an evaluation, written late
  lines = (tmp_path / "metrics.jsonl").read_bytes().splitlines(keepends=True)

  with MetricWriter(str(tmp_path), resume_step=20) as writer:
    kept = (tmp_path / "metrics.jsonl").read_bytes()
    writer.write_scalars(30, {"loss/total": 0.5})
  assert kept == b"".join(lines[:2] + lines[4:])  # steps 10, 20 and the evaluation at 20
  assert [r["step"] for r in read_jsonl(tmp_path)] == [10, 20, 20, 30]
  assert not list(tmp_path.glob(".*.tmp"))

  # The new event file sorts after the first and opens with TensorBoard's restart marker, which
  # hides the first file's events from step 21 on.
  first, second = event_files(tmp_path)
  assert {step for _, step in scalars_of(read_events(first))} == {10, 20, 30, 40}
  events = read_events(second)
  start = [e for e in events if e.HasField("session_log")]
  assert [(e.step, e.session_log.status) for e in start] == [(21, start[0].session_log.START)]
  assert events.index(start[0]) < min(i for i, e in enumerate(events) if e.HasField("summary"))
  assert scalars_of(events) == {("loss/total", 30): 0.5}


def test_resume_with_nothing_to_drop_leaves_the_file_alone(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(5, {"a": 1.0})
  before = os.stat(tmp_path / "metrics.jsonl")
  MetricWriter(str(tmp_path), resume_step=5).close()
  MetricWriter(str(tmp_path)).close()  # resume_step=None keeps everything
  assert os.stat(tmp_path / "metrics.jsonl").st_ino == before.st_ino
  assert read_jsonl(tmp_path) == [{"step": 5, "a": 1.0}]


@pytest.mark.parametrize("resume_step", [None, 7])
def test_a_torn_last_line_is_dropped_on_reopen(tmp_path, resume_step):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"a": 1.0})
    writer.write_scalars(2, {"a": 2.0})
  whole = (tmp_path / "metrics.jsonl").read_bytes()
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 3, "a": 3.')  # a kill mid-write
  with MetricWriter(str(tmp_path), resume_step=resume_step) as writer:
    assert (tmp_path / "metrics.jsonl").read_bytes() == whole
    writer.write_scalars(3, {"a": 3.0})
  assert read_jsonl(tmp_path) == [{"step": s, "a": float(s)} for s in (1, 2, 3)]


def test_a_damaged_middle_line_is_an_error_not_silently_dropped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    MetricWriter(str(tmp_path), resume_step=1)


def test_the_writer_imports_neither_tensorflow_nor_torch(tmp_path):
  # torch is installed where the project's own peers run; tensorboardX would import it.
  code = ("import sys\n"
          "from uad_jax.training import metric_writers\n"
          f"with metric_writers.MetricWriter({str(tmp_path)!r}, resume_step=0) as w:\n"
          "  w.write_scalars(1, {'a': 1.0})\n"
          "assert 'tensorboardX' in sys.modules\n"
          "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_tensorboard_itself_reads_the_files_and_honours_the_restart(tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  with MetricWriter(str(tmp_path), resume_step=0) as writer:
    for step in (1, 2, 3, 4):
      writer.write_scalars(step, {"loss": float(step)})
  with MetricWriter(str(tmp_path), resume_step=2) as writer:
    writer.write_scalars(3, {"loss": 30.0})
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  accumulator.Reload()
  assert [(s.step, s.value) for s in accumulator.Scalars("loss")] == [(1, 1), (2, 2), (3, 30)]


def side(seed, size, num_ids=6, dim=16, viewpoints=None):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, num_ids, size)
  feats = np.random.RandomState(9).randn(num_ids, dim)[ids] + rng.randn(size, dim)
  views = rng.randint(0, 2, size) if viewpoints is None else np.full(size, viewpoints)
  return RetrievalSide(feats.astype(np.float32), ids, rng.randint(0, 7, size),
                       rng.randint(0, 3, size), views)


@pytest.fixture(scope="module")
def results():
  # Ground queries only: the aerial query cells are empty (NaN), as on a split without them.
  query, gallery = side(1, 30, viewpoints=0), side(2, 90)
  results = protocols.evaluate_protocols(query, gallery, camera_rule="market", max_rank=10)
  chance = {"mAP": 0.05, "mINP": 0.01, "cmc": np.linspace(0.1, 1, 10)}
  pixels = {"mAP": 0.09, "mINP": 0.02, "cmc": np.linspace(0.2, 1, 10), "grid": [16, 8]}
  results["baselines"] = {"chance": chance, "raw_pixels": pixels}
  return results


def test_evaluation_scalars(results):
  got = metric_writers.evaluation_scalars(results)
  cells = results["protocols"]
  as_reid = cells["as_reid"][f"all{ARROW}all"]
  expected = {"eval/as_reid/mAP": as_reid["mAP"], "eval/as_reid/mINP": as_reid["mINP"],
              "eval/as_reid/R1": as_reid["cmc"][0], "eval/as_reid/R5": as_reid["cmc"][4],
              "eval/as_reid/R10": as_reid["cmc"][9]}
  for name, m in results["baselines"].items():
    expected |= {f"eval/{name}/mAP": m["mAP"], f"eval/{name}/R1": m["cmc"][0],
                 f"eval/{name}/mINP": m["mINP"]}
  for direction, cell in (("aerial_to_ground", f"aerial{ARROW}ground"),
                          ("ground_to_aerial", f"ground{ARROW}aerial")):
    expected |= {f"eval/viewpoint/{direction}/mAP": cells["viewpoint"][cell]["mAP"],
                 f"eval/viewpoint/{direction}/R1": cells["viewpoint"][cell]["cmc"][0]}
  for protocol in ("modality", "cross_spectral", "scenario"):
    matrix = list(cells[protocol].values())
    expected[f"eval/{protocol}/mean_mAP"] = np.nanmean([m["mAP"] for m in matrix])
    expected[f"eval/{protocol}/mean_R1"] = np.nanmean([m["cmc"][0] for m in matrix])
  assert got.keys() == expected.keys()
  np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-12)
  assert math.isnan(got["eval/viewpoint/aerial_to_ground/mAP"])  # no aerial query
  assert not math.isnan(got["eval/scenario/mean_mAP"])  # the mean of the cells that have one
  assert all(isinstance(v, float) for v in got.values())


def test_evaluation_scalars_of_the_report_json_are_the_same(results, tmp_path):
  report.write_json(results, tmp_path / "retrieval.json")  # NaN written as null
  from_json = metric_writers.evaluation_scalars(report.read_json(tmp_path))
  direct = metric_writers.evaluation_scalars(results)
  assert from_json.keys() == direct.keys()
  np.testing.assert_allclose(list(from_json.values()), list(direct.values()), rtol=1e-12)


def test_evaluation_scalars_without_baselines(results):
  bare = {k: v for k, v in results.items() if k != "baselines"}
  got = metric_writers.evaluation_scalars(bare)
  assert not any(k.startswith(("eval/chance/", "eval/raw_pixels/")) for k in got)
  assert "eval/as_reid/mAP" in got
