"""Training on some of the training identities (``config.dataset.train_identities``).

The subset of N is the first N identities of one seeded order of all of them, so for one seed a
smaller subset is contained in every larger one: a scaling study's points differ only by the
people added. The chosen identities are relabelled 0..N−1 in raw-id order, the order the dataset's
own labels follow. Pure NumPy: the input pipeline applies it, dataset preparation logs it.
"""
import numpy as np

FIELD = "config.dataset.train_identities"
# First word of the subset's seed sequence, apart from the sampler's (0) and augmentation's.
SUBSET_STREAM = 0x1D5
# Raw ids a log line shows before it only counts the rest.
_MAX_SHOWN = 12


def choose(train_person_ids, count: int, seed: int) -> np.ndarray:
  """Sorted raw ids of `count` of the distinct `train_person_ids` (all of them for 0)."""
  ids = np.unique(np.asarray(train_person_ids))
  if count == 0:
    return ids
  if not 0 < count <= len(ids):
    raise ValueError(f"{FIELD}={count}, but the train split has {len(ids)} identities: choose "
                     f"0 (all) or at most {len(ids)}")
  order = np.random.default_rng((SUBSET_STREAM, int(seed))).permutation(len(ids))
  return np.sort(ids[order[:count]])


def relabel(person_ids: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(records kept, their labels 0..len(chosen)−1) of per-record raw ids `person_ids`."""
  kept = np.flatnonzero(np.isin(person_ids, chosen))
  return kept, np.searchsorted(chosen, person_ids[kept]).astype(np.int64)


def describe(chosen, available: int, seed: int) -> str:
  """The log line of a subset: how many of how many, and which."""
  shown = ", ".join(str(int(pid)) for pid in chosen[:_MAX_SHOWN])
  more = f", … ({len(chosen) - _MAX_SHOWN} more)" if len(chosen) > _MAX_SHOWN else ""
  return (f"training on {len(chosen)} of the {available} training identities ({FIELD}, seed "
          f"{seed}; relabelled 0..{len(chosen) - 1}); raw ids {shown}{more}")
