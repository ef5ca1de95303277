"""Joining a multi-process job: ``jax.distributed.initialize`` when this is one of several
processes.

A TPU pod slice runs one process per host, a multi-GPU cluster one per host or per GPU. Each
process must call `jax.distributed.initialize` before anything touches a JAX backend (a
computation, ``jax.devices()``, ``jax.process_index()``); without it every process believes it is
alone and trains the whole job by itself. `initialize` decides whether to call it:

  mode "on"    always (the coordinator, count and id from the arguments, the rest from JAX's
               cluster detection: TPU, SLURM, Open MPI, Kubernetes);
  mode "off"   never: a single-process run even inside a cluster allocation;
  mode "auto"  when the arguments or JAX_COORDINATOR_ADDRESS name a coordinator, a process count
               or id, or when a cluster environment JAX detects has more than one process (a
               one-task SLURM job or a single-host TPU VM stays a plain run).
"""
import os
from typing import Optional, Sequence

from absl import logging
import jax

MODES = ("auto", "on", "off")


def detected_cluster() -> Optional[tuple[str, int]]:
  """(name, process count) of the cluster environment JAX's auto-detection would use, or None.

  The environments are JAX's own (``jax._src.clusters``, what ``jax.distributed.initialize()``
  consults, in its order and without the opt-in ones such as mpi4py), so "auto" starts exactly
  the runs that ``initialize()`` without arguments could start.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    kinds = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    logging.warning("this JAX version does not expose its cluster environments, so "
                    "--distributed=auto cannot detect a cluster: pass --distributed=on (or "
                    "--coordinator_address, --num_processes, --process_id) on a cluster")
    return None
  for kind in kinds:
    if not kind.opt_in_only_method and kind.is_env_present():
      return kind.name, int(kind.get_process_count())
  return None


def initialize(mode: str = "auto", *, coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               initialization_timeout: int = 300) -> bool:
  """Joins the job's other processes if `mode` says so; returns whether this is a distributed run.

  Arguments left None are found by JAX (``JAX_COORDINATOR_ADDRESS``, ``JAX_LOCAL_DEVICE_IDS``,
  the cluster environment). Calling it again once initialised does nothing.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r}: expected one of {MODES}")
  given = {name: value for name, value in (("coordinator_address", coordinator_address),
                                            ("num_processes", num_processes),
                                            ("process_id", process_id),
                                            ("local_device_ids", local_device_ids))
           if value is not None}
  if mode == "off":
    if given:
      raise ValueError(f"--distributed=off contradicts {', '.join(f'--{n}' for n in given)}")
    return False
  if jax.distributed.is_initialized():
    return True
  if mode == "auto" and not _asked_for(given):
    cluster = detected_cluster()
    if cluster is None or cluster[1] <= 1:
      if local_device_ids is not None:
        raise ValueError("--local_device_ids applies to a distributed run, and none was asked for "
                         "or detected; add --distributed=on and the coordinator flags")
      return False
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  return True


def _asked_for(given: dict) -> bool:
  # Device ids alone restrict this process's devices; they do not say there are others.
  return (bool(set(given) - {"local_device_ids"})
          or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))
