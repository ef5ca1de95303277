"""Identity appearance of synthetic people: what stays the same across cameras and modalities.

A person is a set of materials (skin, hair, garments, bag, ...) and a body shape. Each material has
three independent-ish properties, one per sensor, because that is what makes cross-spectral ReID
hard: visible colour (RGB), near-infrared reflectance (NIR: dyes that look alike in colour often
differ in NIR and vice versa), and surface temperature (TIR: set by skin exposure and clothing
insulation, so clothing colour mostly vanishes).
"""
import dataclasses

import numpy as np

# Material ids of the per-pixel material map. 0 is the background (composited separately); the
# occluder (a post, a car) and a neighbouring pedestrian at the crop's edge change per capture.
(BACKGROUND, SKIN, HAIR, TOP, TOP_ACCENT, BOTTOM, BOTTOM_ACCENT, SHOES, BAG, HAT, OCCLUDER,
 NEIGHBOUR) = range(12)
NUM_PERSON_MATERIALS = OCCLUDER  # rows of an Appearance's tables

TOP_PATTERNS = ("plain", "horizontal_stripes", "vertical_stripes", "checks", "chest_logo",
                "open_jacket")
BOTTOM_STYLES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder_bag")

# Common garment colours (sRGB 0..1); sampled with jitter so that similar-looking people exist.
_GARMENT_COLOURS = np.array([
    [0.08, 0.08, 0.09], [0.92, 0.92, 0.90], [0.50, 0.50, 0.52], [0.12, 0.16, 0.35],
    [0.70, 0.12, 0.12], [0.20, 0.40, 0.75], [0.20, 0.45, 0.22], [0.90, 0.80, 0.20],
    [0.90, 0.55, 0.65], [0.40, 0.26, 0.15], [0.80, 0.72, 0.56], [0.90, 0.45, 0.10],
    [0.45, 0.22, 0.55], [0.30, 0.42, 0.58], [0.25, 0.25, 0.28], [0.60, 0.65, 0.45],
])
# Trousers are mostly dark, denim or khaki: indices into _GARMENT_COLOURS, repeated as weights.
_BOTTOM_COLOUR_CHOICES = np.array([0, 0, 0, 3, 3, 13, 13, 13, 2, 14, 10, 9, 1, 4, 5, 6])
_LIGHT_SKIN, _DARK_SKIN = np.array([0.95, 0.78, 0.66]), np.array([0.42, 0.28, 0.2])
_HAIR_COLOURS = np.array([[0.06, 0.05, 0.04], [0.20, 0.12, 0.07], [0.55, 0.42, 0.25],
                          [0.60, 0.60, 0.60], [0.10, 0.08, 0.06]])


@dataclasses.dataclass(frozen=True)
class Appearance:
  """What identifies one synthetic person. Tables are indexed by material id."""
  rgb: np.ndarray  # [NUM_PERSON_MATERIALS, 3] visible reflectance
  nir: np.ndarray  # [NUM_PERSON_MATERIALS] near-infrared reflectance
  heat: np.ndarray  # [NUM_PERSON_MATERIALS] surface temperature, 0 = ambient .. 1 = bare skin
  top_pattern: int  # index into TOP_PATTERNS
  pattern_period: float  # stripe/check period in body heights
  bottom_style: int  # index into BOTTOM_STYLES
  trouser_stripe: bool  # sportswear side stripe in BOTTOM_ACCENT
  long_sleeves: bool
  long_hair: bool
  bag: int  # index into BAGS
  hat: bool
  width: float  # body width relative to an average build
  height: float  # fraction of the crop the body fills
  head: float  # head size relative to average


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float) -> np.ndarray:
  return np.clip(colour + rng.uniform(-amount, amount, size=3), 0.0, 1.0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
  return rgb @ np.array([0.299, 0.587, 0.114])


def _garment_nir(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
  # Dye NIR reflectance is only loosely tied to visible brightness.
  return np.clip(0.35 * _luminance(rgb) + 0.65 * rng.uniform(0.1, 0.95, size=len(rgb)), 0.0, 1.0)


def sample_appearance(rng: np.random.Generator, spectral_coupling: float = 0.0) -> Appearance:
  """A random person.

  `spectral_coupling` in [0, 1] ties each garment's NIR reflectance and temperature to its visible
  brightness (`couple_spectra`); 0, the default, leaves the three sensors' tables independent.
  """
  rgb = np.zeros((NUM_PERSON_MATERIALS, 3))
  skin_tone = rng.uniform()
  rgb[SKIN] = (1 - skin_tone) * _LIGHT_SKIN + skin_tone * _DARK_SKIN
  rgb[HAIR] = _jitter(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 0.04)
  rgb[TOP] = _jitter(rng, _GARMENT_COLOURS[rng.integers(len(_GARMENT_COLOURS))], 0.07)
  rgb[TOP_ACCENT] = _jitter(rng, _GARMENT_COLOURS[rng.integers(len(_GARMENT_COLOURS))], 0.07)
  rgb[BOTTOM] = _jitter(rng, _GARMENT_COLOURS[rng.choice(_BOTTOM_COLOUR_CHOICES)], 0.06)
  rgb[BOTTOM_ACCENT] = _jitter(rng, _GARMENT_COLOURS[rng.integers(len(_GARMENT_COLOURS))], 0.07)
  rgb[SHOES] = _jitter(rng, _GARMENT_COLOURS[rng.choice([0, 0, 1, 1, 2, 9])], 0.05)
  rgb[BAG] = _jitter(rng, _GARMENT_COLOURS[rng.integers(len(_GARMENT_COLOURS))], 0.07)
  rgb[HAT] = _jitter(rng, _GARMENT_COLOURS[rng.integers(len(_GARMENT_COLOURS))], 0.07)

  nir = _garment_nir(rng, rgb)
  nir[SKIN] = rng.uniform(0.55, 0.75)  # skin is bright in NIR whatever its visible tone
  nir[HAIR] = rng.uniform(0.15, 0.45)

  heat = np.empty(NUM_PERSON_MATERIALS)
  heat[SKIN], heat[HAIR] = 1.0, rng.uniform(0.5, 0.65)
  # Thin clothes let body heat through; the accent shares its garment's heat (colour vanishes)
  # except for a faint trace of how much sunlight a darker dye absorbs.
  heat[TOP], heat[BOTTOM] = rng.uniform(0.3, 0.75, size=2)
  heat[TOP_ACCENT] = heat[TOP] + 0.05 * (_luminance(rgb[TOP]) - _luminance(rgb[TOP_ACCENT]))
  heat[BOTTOM_ACCENT] = heat[BOTTOM] + 0.05 * (
      _luminance(rgb[BOTTOM]) - _luminance(rgb[BOTTOM_ACCENT]))
  heat[SHOES], heat[BAG], heat[HAT] = rng.uniform(0.2, 0.3), rng.uniform(0.02, 0.15), 0.35

  if spectral_coupling:  # after every draw: the same people, only their NIR and heat tables move
    nir, heat = couple_spectra(rgb, nir, heat, spectral_coupling)
  return Appearance(
      rgb=rgb, nir=nir, heat=heat,
      top_pattern=int(rng.choice(len(TOP_PATTERNS), p=[0.4, 0.15, 0.1, 0.1, 0.15, 0.1])),
      pattern_period=float(rng.uniform(0.03, 0.08)),
      bottom_style=int(rng.choice(len(BOTTOM_STYLES), p=[0.7, 0.15, 0.15])),
      trouser_stripe=bool(rng.uniform() < 0.15),
      long_sleeves=bool(rng.uniform() < 0.6),
      long_hair=bool(rng.uniform() < 0.35),
      bag=int(rng.choice(len(BAGS), p=[0.5, 0.3, 0.2])),
      hat=bool(rng.uniform() < 0.15),
      width=float(rng.uniform(0.82, 1.25)),
      height=float(rng.uniform(0.88, 1.0)),
      head=float(rng.uniform(0.9, 1.12)),
  )


# Dyed materials, whose NIR `couple_spectra` ties to visible brightness, and those worn on the
# warm body, whose temperature it ties too (a bag stays cold, shoes near the ground's heat).
_DYED = [TOP, TOP_ACCENT, BOTTOM, BOTTOM_ACCENT, SHOES, BAG, HAT]
_WORN = [TOP, TOP_ACCENT, BOTTOM, BOTTOM_ACCENT, HAT]


def couple_spectra(rgb: np.ndarray, nir: np.ndarray, heat: np.ndarray,
                   coupling: float) -> tuple[np.ndarray, np.ndarray]:
  """NIR and heat tables moved towards what the visible colour predicts, by `coupling` ∈ [0, 1].

  At 1 a garment's NIR reflectance is its visible luminance and its temperature falls linearly
  with it (dark dyes absorb more sunlight), so a pattern or a two-tone outfit keeps its layout
  and its ordering of brightness in all three sensors: appearance cues that carry across
  modalities, as they do between real cameras more than in the default's independent tables.
  Skin and hair keep their sensor-specific values.
  """
  if not 0.0 <= coupling <= 1.0:
    raise ValueError(f"spectral coupling must be in [0, 1], got {coupling}")
  nir, heat = nir.copy(), heat.copy()
  nir[_DYED] = (1 - coupling) * nir[_DYED] + coupling * _luminance(rgb[_DYED])
  heat[_WORN] = (1 - coupling) * heat[_WORN] + coupling * (0.75 - 0.55 * _luminance(rgb[_WORN]))
  return nir, heat


def lookalike(base: Appearance, rng: np.random.Generator) -> Appearance:
  """A different person who dresses almost like `base`: same top and build, one or two details
  changed (a bag, the trousers' shade, shoes, hair), so that only details tell them apart."""
  rgb, nir, heat = base.rgb.copy(), base.nir.copy(), base.heat.copy()
  changes = {}
  for detail in rng.choice(["bag", "bottom", "shoes", "hair", "sleeves"], size=2, replace=False):
    if detail == "bag":
      changes["bag"] = int((base.bag + rng.integers(1, len(BAGS))) % len(BAGS))
      rgb[BAG] = _jitter(rng, rgb[BAG], 0.3)
    elif detail == "bottom":
      rgb[BOTTOM] = _jitter(rng, rgb[BOTTOM], 0.15)
      nir[BOTTOM] = np.clip(nir[BOTTOM] + rng.uniform(-0.3, 0.3), 0.0, 1.0)
      heat[BOTTOM] = np.clip(heat[BOTTOM] + rng.uniform(-0.15, 0.15), 0.2, 0.8)
    elif detail == "shoes":
      rgb[SHOES] = 1.0 - rgb[SHOES]
      nir[SHOES] = 1.0 - nir[SHOES]
    elif detail == "hair":
      rgb[HAIR] = _jitter(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 0.04)
      changes["long_hair"] = not base.long_hair
    else:
      changes["long_sleeves"] = not base.long_sleeves
  return dataclasses.replace(
      base, rgb=rgb, nir=nir, heat=heat, width=float(base.width * rng.uniform(0.93, 1.07)),
      **changes)
