"""The P×M×K epoch sampler (spec §2): which train records form each batch and step of an epoch.

Pure NumPy on per-record metadata (contiguous train label and modality of every record), so it
runs without images, TFDS or Grain. One epoch, deterministic given (seed, epoch):

1. Per identity, ``need = max_m max(n_m, K)`` rounded down to a multiple of K. A modality with
   n_m ≥ need draws ``need`` records without replacement; one with n_m < need repeats every record
   ⌊need/n_m⌋ times plus r = need mod n_m distinct random extras. Each list is shuffled and cut
   into need/K groups of K, so all modalities of an identity have the same number of groups.
2. Repeatedly draw P distinct identities uniformly from those with groups left and pop the next
   group of every modality of each (a "tuple": the same group position for all M modalities; its
   images are independent draws, not a synchronised capture). An identity leaves the pool when its
   groups run out; the epoch ends when fewer than P identities remain.

Batch layout (what the losses rely on): modality-major ``[RGB block; NIR block; TIR block]``, each
block P·K rows, rows p·K … p·K+K−1 identity p; labels are the P·K labels repeated M times.
A step holds R consecutive batches, one per replica group, group-major: group r is rows
r·M·P·K … (r+1)·M·P·K−1; an epoch has ⌊num_batches / R⌋ steps (the tail is dropped).

The number of batches depends on the order identities are drawn in, so it varies (slightly) from
epoch to epoch, as in the reference; ``steps_in_epoch(epoch)`` gives it exactly from the metadata.
"""
import dataclasses
import warnings

import numpy as np

DEFAULT_MODALITY_NAMES = ("RGB", "NIR", "TIR")
MISSING_MODALITY_POLICIES = ("error", "drop")
# First word of the sampler's seed sequence, so its draws never coincide with the augmentation's.
SAMPLER_STREAM = 0
# How many offending identities an error message lists before it only counts the rest.
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """P identities × M modalities × K instances per replica group, R groups per optimizer step."""
  identities: int  # P
  instances: int  # K
  modalities: int = 3  # M
  replicas: int = 1  # R

  def __post_init__(self):
    for name in ("identities", "instances", "modalities", "replicas"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"BatchShape.{name} must be a positive integer, got {value!r}")

  @property
  def batch_rows(self) -> int:
    """Rows of one replica group's batch: M·P·K."""
    return self.modalities * self.identities * self.instances

  @property
  def step_rows(self) -> int:
    """Rows of one optimizer step (the global batch): R·M·P·K."""
    return self.replicas * self.batch_rows


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  """The sampler's generator for one epoch; the same (seed, epoch) gives the same draws."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
  return np.random.default_rng((SAMPLER_STREAM, int(seed), int(epoch)))


class PMKSampler:
  """Plans the batches of every epoch from per-record train labels and modalities.

  Args:
    labels: [N] contiguous train label of every record (0..C−1).
    modalities: [N] modality of every record, 0..M−1 (RGB, NIR, TIR).
    shape: P, K, M and R.
    seed: base seed; epoch e draws from (seed, e).
    missing_modality: what to do with identities that lack a modality in train. "error" (default)
      raises naming them; "drop" leaves them out of every batch (their labels stay in the
      classifier) and warns listing them.
    person_ids: optional [N] raw person ids, only to name identities in messages.
    modality_names: names of modalities 0..M−1 for messages.
  """

  def __init__(self, labels, modalities, shape: BatchShape, *, seed: int,
               missing_modality: str = "error", person_ids=None,
               modality_names: tuple[str, ...] = DEFAULT_MODALITY_NAMES):
    labels = _as_index_array(labels, "labels")
    modalities = _as_index_array(modalities, "modalities")
    if labels.shape != modalities.shape:
      raise ValueError(f"labels and modalities must have the same length, got {labels.shape} "
                       f"and {modalities.shape}")
    if missing_modality not in MISSING_MODALITY_POLICIES:
      raise ValueError(f"missing_modality={missing_modality!r}; expected one of "
                       f"{MISSING_MODALITY_POLICIES}")
    bad = np.flatnonzero(modalities >= shape.modalities)
    if bad.size:
      raise ValueError(f"record {bad[0]} has modality {modalities[bad[0]]}, but the sampler uses "
                       f"M={shape.modalities} modalities (0..{shape.modalities - 1})")
    self.shape = shape
    self.seed = int(seed)
    epoch_rng(self.seed, 0)  # validates the seed now rather than at the first epoch
    names = tuple(modality_names) + tuple(
        f"modality {m}" for m in range(len(modality_names), shape.modalities))

    # records[i][m]: sorted record indices of identity i in modality m.
    order = np.lexsort((modalities, labels))
    identities, starts = np.unique(labels[order], return_index=True)
    per_identity = np.split(order, starts[1:])
    records = [[rows[modalities[rows] == m] for m in range(shape.modalities)]
               for rows in per_identity]

    incomplete = [(int(label), [names[m] for m in range(shape.modalities) if not len(rs[m])])
                  for label, rs in zip(identities, records)
                  if any(len(r) == 0 for r in rs)]
    if incomplete:
      described = _describe_identities(incomplete, labels, person_ids)
      if missing_modality == "error":
        raise ValueError(
            f"{len(incomplete)} train identities miss a modality, so no P×M×K tuple can be "
            f"built for them:\n{described}\nFix the data, or pass missing_modality='drop' to "
            f"train without them.")
      warnings.warn(f"missing_modality='drop': leaving out {len(incomplete)} train identities "
                    f"that miss a modality:\n{described}", stacklevel=2)
      keep = [i for i, rs in enumerate(records) if all(len(r) for r in rs)]
      identities = identities[keep]
      records = [records[i] for i in keep]

    if len(identities) < shape.identities:
      raise ValueError(f"only {len(identities)} usable train identities, fewer than the "
                       f"P={shape.identities} identities a batch needs (sampler.identities)")
    self.identities = identities  # labels of the identities that take part, sorted
    self._records = records
    k = shape.instances
    most = np.array([max(max(len(r), k) for r in rs) for rs in records])
    self.need = most - most % k  # images per modality of each identity in every epoch
    self._steps_cache: dict[int, int] = {}

  @property
  def num_identities(self) -> int:
    return len(self.identities)

  def _identity_groups(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All groups of the epoch as [G, M, K] record indices, and where each identity's start."""
    k = self.shape.instances
    per_identity = []
    for need, rs in zip(self.need, self._records):
      lists = [_draw(r, int(need), rng) for r in rs]
      per_identity.append(np.stack(lists).reshape(len(rs), need // k, k).transpose(1, 0, 2))
    first_group = np.concatenate([[0], np.cumsum(self.need // k)[:-1]])
    return np.concatenate(per_identity), first_group

  def epoch_batches(self, epoch: int) -> np.ndarray:
    """[num_batches, M·P·K] record indices of every batch of `epoch` (0-based), in order."""
    rng = epoch_rng(self.seed, epoch)
    groups, first_group = self._identity_groups(rng)
    groups_left = self.need // self.shape.instances
    next_group = first_group.copy()
    pool = np.arange(self.num_identities)
    p = self.shape.identities
    picked = []  # [P] group indices per batch
    while len(pool) >= p:
      chosen = pool[rng.choice(len(pool), size=p, replace=False)]
      picked.append(next_group[chosen])
      next_group[chosen] += 1
      groups_left[chosen] -= 1
      if np.any(groups_left[chosen] == 0):
        pool = pool[groups_left[pool] > 0]
    if not picked:
      return np.zeros((0, self.shape.batch_rows), np.int64)
    batches = groups[np.stack(picked)]  # [B, P, M, K]
    return batches.transpose(0, 2, 1, 3).reshape(len(picked), -1)  # modality-major rows

  def epoch_steps(self, epoch: int) -> np.ndarray:
    """[steps, R·M·P·K] record indices of every optimizer step of `epoch`; group-major rows."""
    batches = self.epoch_batches(epoch)
    steps = len(batches) // self.shape.replicas
    self._steps_cache[epoch] = steps
    return batches[:steps * self.shape.replicas].reshape(steps, self.shape.step_rows)

  def steps_in_epoch(self, epoch: int) -> int:
    """Optimizer steps of `epoch`: ⌊batches / R⌋. Plans the epoch (cheap, no images) once."""
    if epoch not in self._steps_cache:
      self.epoch_steps(epoch)
    return self._steps_cache[epoch]

  def steps_per_epoch(self, num_epochs: int) -> tuple[int, ...]:
    """Steps of epochs 0 … num_epochs−1."""
    return tuple(self.steps_in_epoch(e) for e in range(num_epochs))


def batch_labels(labels: np.ndarray, batch_records: np.ndarray) -> np.ndarray:
  """int32 labels of the rows of a batch or step (given its record indices)."""
  return np.asarray(labels, np.int32)[batch_records]


def _draw(records: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
  """`need` records of one identity and modality, shuffled: a sample or a tiling (spec §2)."""
  n = len(records)
  if n >= need:
    return rng.choice(records, size=need, replace=False)
  repeats, extra = divmod(need, n)
  tiled = np.concatenate([np.tile(records, repeats), rng.choice(records, extra, replace=False)])
  return rng.permutation(tiled)


def _as_index_array(values, name: str) -> np.ndarray:
  array = np.asarray(values)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array (one entry per record), got shape "
                     f"{array.shape}")
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
  if array.size and array.min() < 0:
    raise ValueError(f"{name} must be non-negative, found {array.min()} at record "
                     f"{int(np.argmin(array))}")
  return array.astype(np.int64)


def _describe_identities(incomplete, labels, person_ids) -> str:
  """One line per identity: label, raw person id if known, and the modalities it lacks."""
  lines = []
  for label, missing in incomplete[:_MAX_LISTED]:
    name = f"label {label}"
    if person_ids is not None:
      name += f" (person id {int(np.asarray(person_ids)[np.argmax(labels == label)])})"
    lines.append(f"  {name}: no {', '.join(missing)} images")
  if len(incomplete) > _MAX_LISTED:
    lines.append(f"  ... and {len(incomplete) - _MAX_LISTED} more")
  return "\n".join(lines)
