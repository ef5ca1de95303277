"""The flags every command shares, defined once: absl refuses a flag name defined by two modules,
and the commands are imported side by side (by the tests, and by one another's users)."""
from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", "configs/uad.py:synthetic",
                                         "Config file and its argument.", lock_config=True)
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the command writes; default workdir/synthetic for training, "
    "workdir/ablation and workdir/scaling for those commands.")

CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "Which checkpoint of --workdir: latest, best (by AS-ReID mAP) or a "
    "step; for --mode=eval and the retrieval tools (embed, search, export).")


def workdir(default: str) -> str:
  return WORKDIR.value or default
