"""A run's scalars as JAX users read them: TensorBoard event files under workdir/tensorboard/ and
one JSON object per line in workdir/metrics.jsonl, both written by process 0 only.

TensorBoard files are written without TensorFlow (whose `tf.summary`, clu's and flax's metric
writers all import it): tensorboardX's record writer and event protos, synchronously. Its
`SummaryWriter` queues events for a background thread, and its `flush()` does not drain that
queue, so a flushed writer may still hold the last events; here a `write_scalars` that returns
has both files written and synced to disk. This is the only module that imports tensorboardX.

metrics.jsonl holds {"step": step, name: value, ...} per call; a non-finite value is written as
null (strict JSON has no NaN; the evaluation reports do the same), while the TensorBoard event
keeps it as NaN or ±inf. TensorBoard stores float32, the JSON float64.

Resuming at step S drops what the interrupted run wrote after S, which the resumed run writes
again: metrics.jsonl is rewritten without those lines (atomically), and the new event file starts
with TensorBoard's restart marker (a SessionLog START at step S + 1, as tensorboardX's
`purge_step` writes it). TensorBoard's Python loader (`--load_fast=false`) then hides every
older event from step S + 1 on; its default Rust loader ignores the marker and drops a tag's later
points only when the resumed run writes that tag again, which the train scalars do at their next
logging step.
"""
import json
import math
import os
import socket
import sys
import time

import numpy as np

from uad_jax.evaluation import report
from uad_jax.evaluation.protocols import ARROW

JSONL_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _tensorboardx():
  """(RecordWriter, event_pb2, summary_pb2) of tensorboardX, imported without torch.

  Importing tensorboardX tries `import torch`, to accept torch tensors. A JAX run has none to
  give it, and where torch is installed that import takes about a second and, for a CUDA build,
  loads torch's CUDA libraries into the process beside JAX's. A None entry in sys.modules makes
  the attempt fail at once (tensorboardX catches the ImportError); it is removed right after, so
  a later `import torch` elsewhere works as usual.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None
  try:
    from tensorboardX import RecordWriter
    from tensorboardX.proto import event_pb2, summary_pb2
  finally:
    if blocked and "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return RecordWriter, event_pb2, summary_pb2


class MetricWriter:
  """Scalars per step into workdir/tensorboard/ and workdir/metrics.jsonl.

  enabled=False (processes other than 0) writes, creates and imports nothing. resume_step=S
  (the step of the checkpoint a run starts from, 0 for a fresh run) drops what was written after
  S; None keeps everything. A usable context manager: leaving the `with` closes the files.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._closed = not enabled
    if not enabled:
      return
    record_writer, self._event_pb2, self._summary_pb2 = _tensorboardx()
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, JSONL_FILE)
    _keep_whole_lines_up_to(self.jsonl_path, resume_step)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    os.makedirs(self.tensorboard_dir, exist_ok=True)
    # The usual name, then the nanoseconds: TensorBoard reads a folder's event files in name
    # order, and two writers opened within one second (tests; a quick restart) must neither share
    # a file nor swap their order.
    now = time.time_ns()
    name = (f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}."
            f"{now % 10**9:09d}")
    self.event_path = os.path.join(self.tensorboard_dir, name)
    self._events = record_writer(self.event_path)
    self._write_event(file_version="brain.Event:2")
    if resume_step is not None:
      start = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
      self._write_event(step=resume_step + 1, session_log=start)
    self.flush()

  def write_scalars(self, step: int, scalars: dict) -> None:
    """One record of `scalars` (Python, NumPy or 0-d JAX numbers) at `step`; durable on return.

    Fetch device values in one `jax.device_get` first: each float() here is a transfer.
    """
    if not self.enabled or not scalars:
      return
    if self._closed:
      raise ValueError("write_scalars on a closed MetricWriter")
    values = {name: _scalar(name, value) for name, value in scalars.items()}
    if "step" in values:
      raise ValueError("'step' names the record's step in metrics.jsonl; rename the scalar")
    step = int(step)
    self._write_event(step=step, summary=self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=name, simple_value=value)
        for name, value in values.items()]))
    finite = {name: value if math.isfinite(value) else None for name, value in values.items()}
    # One write of one whole line: a killed process leaves whole lines and at most one torn last
    # line, which the next open drops.
    self._jsonl.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
    self.flush()

  def flush(self) -> None:
    """Both files to disk (write_scalars already does this after each record)."""
    if self._closed:
      return
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    self._events.flush()  # RecordWriter.flush also syncs

  def close(self) -> None:
    if self._closed:
      return
    self.flush()
    self._jsonl.close()
    self._events.close()
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _write_event(self, step: int = 0, **fields) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=step, **fields)
    self._events.write(event.SerializeToString())


def _scalar(name: str, value) -> float:
  if not isinstance(name, str):
    raise TypeError(f"scalar names must be strings, got {name!r}")
  if np.ndim(value) != 0:
    raise ValueError(f"{name}: expected a scalar, got shape {np.shape(value)}")
  return float(value)


def _keep_whole_lines_up_to(path: str, resume_step: int | None) -> None:
  """Rewrites `path` (atomically) without a torn last line and without the lines after
  `resume_step`; leaves it untouched when there is nothing to drop."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  torn = lines.pop()  # b"" when the file ends with a whole line
  kept = []
  for number, line in enumerate(lines, 1):
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError) as error:
      raise ValueError(f"{path}, line {number}: not a record of this writer ({error}); the "
                       f"file was edited or damaged other than by an interrupted write") from None
    if resume_step is None or step <= resume_step:
      kept.append(line)
  if torn or len(kept) < len(lines):
    report.write_atomically(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))


def evaluation_scalars(results: dict) -> dict[str, float]:
  """The headline numbers of an evaluation (`protocols.evaluate_protocols` results with the
  "baselines" inference adds, or their JSON), as fractions in [0, 1]:

  eval/as_reid/{mAP,R1,R5,R10,mINP}; eval/{chance,raw_pixels}/{mAP,R1,mINP} (what the model must
  beat); eval/viewpoint/{aerial_to_ground,ground_to_aerial}/{mAP,R1} (AG-ReID); and
  eval/{modality,cross_spectral,scenario}/{mean_mAP,mean_R1}, unweighted means over the cells
  that have a valid query (NaN if none has). A missing value (JSON null) is NaN.
  """
  cells = results["protocols"]
  scalars = _cell_scalars("eval/as_reid", cells["as_reid"][f"all{ARROW}all"],
                          report.REPORTED_RANKS, with_minp=True)
  baselines = results.get("baselines") or {}
  for name in ("chance", "raw_pixels"):
    if name in baselines:
      scalars |= _cell_scalars(f"eval/{name}", baselines[name], (1,), with_minp=True)
  for cell, metrics in cells["viewpoint"].items():
    scalars |= _cell_scalars(f"eval/viewpoint/{cell.replace(ARROW, '_to_')}", metrics, (1,),
                             with_minp=False)
  for protocol in ("modality", "cross_spectral", "scenario"):
    matrix = cells[protocol].values()
    scalars[f"eval/{protocol}/mean_mAP"] = _mean_of_valid([m["mAP"] for m in matrix])
    scalars[f"eval/{protocol}/mean_R1"] = _mean_of_valid([_rank(m, 1) for m in matrix])
  return scalars


def _cell_scalars(prefix: str, metrics: dict, ranks, with_minp: bool) -> dict[str, float]:
  scalars = {f"{prefix}/mAP": _number(metrics["mAP"])}
  scalars |= {f"{prefix}/R{rank}": _rank(metrics, rank) for rank in ranks}
  if with_minp:
    scalars[f"{prefix}/mINP"] = _number(metrics["mINP"])
  return scalars


def _rank(metrics: dict, rank: int) -> float:
  cmc = metrics["cmc"]
  return _number(cmc[rank - 1]) if rank <= len(cmc) else math.nan


def _number(value) -> float:
  return math.nan if value is None else float(value)


def _mean_of_valid(values) -> float:
  valid = [v for v in map(_number, values) if not math.isnan(v)]
  return sum(valid) / len(valid) if valid else math.nan
