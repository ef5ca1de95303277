"""Renders one capture of a synthetic person in the three modalities (NumPy, no per-pixel loops).

A capture is one frame of one camera: the body is drawn once into a per-pixel material map (which
material each pixel shows), and each sensor then looks the materials up in its own table
(visible colour, NIR reflectance, temperature) over its own version of the background, with its
own lighting response and noise. This is what makes the RGB, NIR and TIR images of one frame
agree in shape but differ in what identifies the person.
"""
import dataclasses
import functools

import numpy as np

from tfds_whumars import synthetic_people as people

FRONT, BACK, LEFT, RIGHT = range(4)


@dataclasses.dataclass(frozen=True)
class BodyLayout:
  """Landmarks of a standing person, in body heights (v: 0 top of head .. 1 soles)."""
  head_y: float
  head_r: float
  shoulder_y: float
  hip_y: float
  knee_y: float
  ankle_y: float
  shoulder_hw: float  # half widths
  waist_hw: float
  leg_hw: float
  arm_hw: float


GROUND_BODY = BodyLayout(head_y=0.07, head_r=0.062, shoulder_y=0.16, hip_y=0.52, knee_y=0.74,
                         ankle_y=0.955, shoulder_hw=0.115, waist_hw=0.095, leg_hw=0.042,
                         arm_hw=0.03)
# Seen obliquely from above: head and shoulders take more of the crop, legs are foreshortened.
AERIAL_BODY = BodyLayout(head_y=0.16, head_r=0.13, shoulder_y=0.3, hip_y=0.64, knee_y=0.8,
                         ankle_y=0.94, shoulder_hw=0.2, waist_hw=0.15, leg_hw=0.055, arm_hw=0.05)

# Typical person height in pixels per camera (near and far cameras); log-normal jitter around it.
_GROUND_TYPICAL_HEIGHT = (210, 150, 120, 175, 100)
_AERIAL_TYPICAL_HEIGHT = (75, 55)


@dataclasses.dataclass(frozen=True)
class _Scene:
  """What a camera's surroundings look like; fixed per camera so each camera has its own look."""
  upper: np.ndarray  # wall / sky colour (ground cameras) or main ground colour (aerial)
  lower: np.ndarray  # pavement colour
  clutter: np.ndarray  # [4, 3] colours of things around
  marking_angle: float  # road markings seen from the air


@functools.lru_cache(maxsize=None)
def _scene(viewpoint: str, camera: int) -> _Scene:
  rng = np.random.default_rng([camera, viewpoint == "aerial"])
  base = rng.uniform(0.2, 0.7, size=(2, 3))
  if viewpoint == "aerial":
    base[0] = [0.25, 0.42, 0.2] if camera % 2 else [0.38, 0.38, 0.36]  # grass or asphalt
  return _Scene(upper=base[0], lower=base[1], clutter=rng.uniform(0.05, 0.95, size=(4, 3)),
                marking_angle=float(rng.uniform(0, np.pi)))


@dataclasses.dataclass(frozen=True)
class _Frame:
  """Pixel grid of a crop expressed in body coordinates: v [h,1] top-down, u [h,w] sideways."""
  v: np.ndarray
  u: np.ndarray
  y: np.ndarray  # crop coordinates 0..1 [h,1] and in crop heights [1,w], for the background
  x: np.ndarray


def _crop_size(viewpoint: str, camera: int, rng: np.random.Generator,
               crop_scale: float) -> tuple[int, int]:
  if viewpoint == "aerial":
    typical = _AERIAL_TYPICAL_HEIGHT[camera % len(_AERIAL_TYPICAL_HEIGHT)]
    height, aspect = np.clip(typical * np.exp(rng.normal(0, 0.3)), 32, 130), rng.uniform(0.6, 1.0)
  else:
    typical = _GROUND_TYPICAL_HEIGHT[camera % len(_GROUND_TYPICAL_HEIGHT)]
    height, aspect = np.clip(typical * np.exp(rng.normal(0, 0.3)), 80, 300), rng.uniform(0.36, 0.5)
  h = max(16, int(round(height * crop_scale)))
  return h, max(8, int(round(h * aspect)))


def _body_frame(h: int, w: int, appearance: people.Appearance,
                rng: np.random.Generator) -> _Frame:
  bottom = 1.0 - rng.uniform(0.0, 0.05)
  body_h = (bottom - rng.uniform(0.01, 0.08)) * appearance.height
  y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
  x = ((np.arange(w, dtype=np.float32) + 0.5) / h)[None, :]
  centre = w / h * (0.5 + rng.uniform(-0.08, 0.08))
  v = (y - (bottom - body_h)) / body_h
  lean = rng.normal(0.0, 0.03)
  u = (x - centre) / body_h - lean * (v - 1.0)
  return _Frame(v=v, u=u, y=y, x=x)


def _band(v: np.ndarray, low: float, high: float) -> np.ndarray:
  return (v >= low) & (v < high)


def _limb(frame: _Frame, start: tuple[float, float], end: tuple[float, float],
          half_width: float) -> tuple[np.ndarray, np.ndarray]:
  """Mask of a straight limb from (u, v) `start` to `end`, and how far along it each pixel is."""
  along = np.clip((frame.v - start[1]) / (end[1] - start[1]), 0.0, 1.0)
  centre = start[0] + along * (end[0] - start[0])
  mask = (np.abs(frame.u - centre) < half_width) & _band(frame.v, start[1], end[1])
  return mask, along


def _draw_legs(m, frame, body, a, orientation, phase, width):
  stride = 0.09 * np.sin(phase) if orientation in (LEFT, RIGHT) else 0.012 * np.sin(phase)
  hip_offset = 0.045 * width * (0.5 if orientation in (LEFT, RIGHT) else 1.0)
  shorts_end = body.hip_y + 0.45 * (body.knee_y - body.hip_y)
  for side in (-1.0, 1.0):
    hip_x, foot_x = side * hip_offset, side * hip_offset + side * stride
    leg, along = _limb(frame, (hip_x, body.hip_y), (foot_x, body.ankle_y), body.leg_hw * width)
    bare = frame.v > (shorts_end if a.bottom_style != 0 else 2.0)
    m[leg] = people.BOTTOM
    m[leg & bare] = people.SKIN
    if a.trouser_stripe and a.bottom_style == 0:
      centre = hip_x + along * (foot_x - hip_x)
      m[leg & (np.abs(frame.u - centre - side * body.leg_hw * width * 0.7) < 0.01)] = (
          people.BOTTOM_ACCENT)
    m[(np.abs(frame.u - foot_x) < body.leg_hw * width * 1.25)
      & _band(frame.v, body.ankle_y, 1.0)] = people.SHOES
  if a.bottom_style == 2:  # skirt: flares from the waist to above the knee
    along = np.clip((frame.v - body.hip_y) / (body.knee_y - body.hip_y), 0.0, 1.0)
    skirt = (np.abs(frame.u) < body.waist_hw * width * (1.0 + 0.7 * along)) & _band(
        frame.v, body.hip_y, body.knee_y - 0.03)
    m[skirt] = people.BOTTOM


def _draw_torso(m, frame, body, a, orientation, width):
  along = np.clip((frame.v - body.shoulder_y) / (body.hip_y - body.shoulder_y), 0.0, 1.0)
  half_width = (body.shoulder_hw + along * (body.waist_hw - body.shoulder_hw)) * width
  torso = (np.abs(frame.u) < half_width) & _band(frame.v, body.shoulder_y - 0.01, body.hip_y + 0.02)
  m[torso] = people.TOP
  pattern = people.TOP_PATTERNS[a.top_pattern]
  stripes_v = (frame.v / a.pattern_period) % 1.0 < 0.45
  stripes_u = (frame.u / a.pattern_period) % 1.0 < 0.45
  if pattern == "horizontal_stripes":
    accent = stripes_v
  elif pattern == "vertical_stripes":
    accent = stripes_u
  elif pattern == "checks":
    accent = stripes_u ^ stripes_v
  elif pattern == "chest_logo" and orientation == FRONT:
    accent = (np.abs(frame.u) < 0.045) & _band(frame.v, body.shoulder_y + 0.05,
                                               body.shoulder_y + 0.13)
  elif pattern == "open_jacket" and orientation == FRONT:
    accent = np.abs(frame.u) < 0.022 * width + 0.008
  else:
    return
  m[torso & accent] = people.TOP_ACCENT


def _draw_arms(m, frame, body, a, orientation, phase, width):
  swing = 0.07 * np.sin(phase) if orientation in (LEFT, RIGHT) else 0.015 * np.sin(phase)
  hand_y = body.hip_y + 0.04
  for side in (-1.0, 1.0):
    shoulder_x = side * (body.shoulder_hw * width - body.arm_hw * 0.6)
    if orientation in (LEFT, RIGHT):
      shoulder_x *= 0.3  # the arms hang over the narrow side of the body
    hand_x = shoulder_x + side * 0.025 - side * swing
    arm, along = _limb(frame, (shoulder_x, body.shoulder_y), (hand_x, hand_y),
                       body.arm_hw * width)
    m[arm] = people.TOP
    m[arm & (along > (0.88 if a.long_sleeves else 0.45))] = people.SKIN


def _draw_head(m, frame, body, a, orientation, viewpoint):
  r = body.head_r * a.head
  dy = (frame.v - body.head_y) / r
  du = frame.u / (0.82 * r)
  head = du ** 2 + dy ** 2 < 1.0
  m[(np.abs(frame.u) < 0.022) & _band(frame.v, body.head_y + 0.6 * r, body.shoulder_y + 0.01)] = (
      people.SKIN)
  if orientation == BACK:
    hair = head
  elif viewpoint == "aerial":
    hair = head & (dy < 0.35)  # from above the top of the head hides most of the face
  elif orientation == FRONT:
    hair = head & ((dy < -0.3) | ((np.abs(du) > 0.6) & (dy < 0.2)))
  else:
    facing = 1.0 if orientation == RIGHT else -1.0
    hair = head & ((dy < -0.3) | (du * facing < -0.2))
  m[head] = people.SKIN
  m[hair] = people.HAIR
  if a.hat:
    m[(head & (dy < -0.25)) | ((np.abs(du) < 1.25) & (np.abs(dy + 0.25) < 0.1))] = people.HAT


def _draw_long_hair(m, frame, body, a, orientation):
  r = body.head_r * a.head
  hair = (np.abs(frame.u) < 0.95 * r) & _band(frame.v, body.head_y, body.shoulder_y + 0.1)
  if orientation != BACK:
    hair &= np.abs(frame.u) > 0.55 * r  # only frames the face
  m[hair] = people.HAIR


def _draw_bag(m, frame, body, a, orientation, width, behind: bool):
  """Backpacks hang behind the body (drawn first, except seen from the back); a shoulder bag hangs
  at the hip in front of it."""
  bag = people.BAGS[a.bag]
  shoulder_hw = body.shoulder_hw * width
  straps = _band(frame.v, body.shoulder_y, body.shoulder_y + 0.22)
  if bag == "backpack" and behind and orientation in (LEFT, RIGHT):
    facing = 1.0 if orientation == RIGHT else -1.0
    back = -frame.u * facing
    m[(back > 0.3 * shoulder_hw) & (back < 0.3 * shoulder_hw + 0.08) & straps] = people.BAG
  elif bag == "backpack" and not behind and orientation == BACK:
    m[(np.abs(frame.u) < 0.75 * shoulder_hw) & _band(frame.v, body.shoulder_y + 0.03,
                                                      body.shoulder_y + 0.25)] = people.BAG
  elif bag == "backpack" and not behind and orientation == FRONT:
    m[(np.abs(np.abs(frame.u) - 0.55 * shoulder_hw) < 0.014) & straps] = people.BAG
  elif bag == "shoulder_bag" and not behind:
    side = 1.0 if orientation != LEFT else -1.0
    m[(np.abs(frame.u - side * (body.waist_hw * width + 0.035)) < 0.04)
      & _band(frame.v, body.hip_y - 0.09, body.hip_y + 0.04)] = people.BAG


def _draw_clutter_in_front(m, frame, rng):
  """Partial occlusion by a post or a car, and a neighbouring pedestrian cut by the crop."""
  h, w = m.shape
  if rng.uniform() < 0.12:
    if rng.uniform() < 0.5:
      x0 = rng.integers(0, w)
      m[:, x0:x0 + max(2, w // rng.integers(6, 12))] = people.OCCLUDER
    else:
      m[int(h * rng.uniform(0.65, 0.9)):, :] = people.OCCLUDER
  if rng.uniform() < 0.25:
    width = max(2, int(w * rng.uniform(0.08, 0.18)))
    top = int(h * rng.uniform(0.1, 0.4))
    columns = slice(0, width) if rng.uniform() < 0.5 else slice(w - width, w)
    m[top:, columns] = people.NEIGHBOUR


def draw_materials(frame: _Frame, a: people.Appearance, viewpoint: str,
                   rng: np.random.Generator) -> np.ndarray:
  """The per-pixel material map [h,w] of one capture, painted back to front."""
  body = AERIAL_BODY if viewpoint == "aerial" else GROUND_BODY
  orientation = int(rng.integers(4))
  phase = rng.uniform(0, 2 * np.pi)
  width = a.width * (0.62 if orientation in (LEFT, RIGHT) else 1.0)
  m = np.zeros(np.broadcast_shapes(frame.v.shape, frame.u.shape), np.uint8)
  _draw_bag(m, frame, body, a, orientation, width, behind=True)
  if a.long_hair and orientation != BACK:
    _draw_long_hair(m, frame, body, a, orientation)
  _draw_legs(m, frame, body, a, orientation, phase, width)
  _draw_torso(m, frame, body, a, orientation, width)
  if a.long_hair and orientation == BACK:
    _draw_long_hair(m, frame, body, a, orientation)
  _draw_bag(m, frame, body, a, orientation, width, behind=False)
  _draw_arms(m, frame, body, a, orientation, phase, width)
  _draw_head(m, frame, body, a, orientation, viewpoint)
  _draw_clutter_in_front(m, frame, rng)
  return m


def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
  """[size, cells] weights that linearly interpolate `cells` control points over `size` pixels."""
  position = np.linspace(0.0, cells - 1.0, size, dtype=np.float32)
  return np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(cells, dtype=np.float32)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, amplitude: float) -> np.ndarray:
  """Low-frequency blotches [h,w,3] (stains, shade, vegetation), cheap to make at any size."""
  # Mostly brightness, a little hue: real scenes are not rainbow-coloured.
  grid = rng.normal(0.0, amplitude, size=(4, 4, 1)) + rng.normal(0.0, amplitude / 3, (4, 4, 3))
  grid = grid.astype(np.float32)
  rows = np.tensordot(_interpolation_matrix(h, 4), grid, axes=1)  # [h, 4, 3]
  return _interpolation_matrix(w, 4) @ rows  # [w, 4] @ [h, 4, 3] -> [h, w, 3]


def _background_rgb(frame: _Frame, viewpoint: str, camera: int,
                    rng: np.random.Generator) -> np.ndarray:
  scene = _scene(viewpoint, camera)
  h, w = frame.y.shape[0], frame.x.shape[1]
  if viewpoint == "aerial":
    image = np.broadcast_to(scene.upper, (h, w, 3)).astype(np.float32)
    angle = scene.marking_angle + rng.normal(0.0, 0.3)
    across = (frame.x * np.cos(angle) + frame.y * np.sin(angle)) / rng.uniform(0.25, 0.6)
    image = np.where((across % 1.0 < 0.1)[..., None], np.float32(0.85), image)
  else:
    horizon = rng.uniform(0.3, 0.7)
    below = np.clip((frame.y - horizon) / 0.08 + 0.5, 0.0, 1.0)[..., None]
    image = ((1.0 - below) * scene.upper + below * scene.lower).astype(np.float32)
    image = np.broadcast_to(image, (h, w, 3))
  image = image + _smooth_noise(rng, h, w, 0.08)
  for _ in range(rng.integers(3, 9)):  # a handful of boxes: poles, signs, windows, cars
    colour = np.clip(scene.clutter[rng.integers(4)] + rng.normal(0.0, 0.08, 3), 0.0, 1.0)
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    image[y0:y0 + rng.integers(2, h // 2 + 3), x0:x0 + rng.integers(2, w // 2 + 3)] = colour
  return np.clip(image, 0.0, 1.0)


def _luminance(image: np.ndarray) -> np.ndarray:
  return image @ np.array([0.299, 0.587, 0.114], np.float32)


def _blur(image: np.ndarray) -> np.ndarray:
  """[1 2 1]/4 along both axes, edges repeated."""
  p = np.pad(image, ((1, 1), (1, 1)) + ((0, 0),) * (image.ndim - 2), mode="edge")
  rows = (p[:-2] + 2.0 * p[1:-1] + p[2:]) * 0.25
  return (rows[:, :-2] + 2.0 * rows[:, 1:-1] + rows[:, 2:]) * 0.25


def _low_resolution(image: np.ndarray) -> np.ndarray:
  """Halves then restores the resolution: thermal sensors have few, large pixels."""
  h, w = image.shape
  h2, w2 = h // 2, w // 2
  small = image[:2 * h2, :2 * w2].reshape(h2, 2, w2, 2).mean(axis=(1, 3))
  return np.pad(small.repeat(2, axis=0).repeat(2, axis=1), ((0, h - 2 * h2), (0, w - 2 * w2)),
                mode="edge")


def _to_uint8(image: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
  noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
  return (np.clip(noisy, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _capture_tables(a: people.Appearance, rng: np.random.Generator):
  """Appearance tables extended by this capture's occluder and neighbour materials."""
  extra_rgb = rng.uniform(0.05, 0.95, size=(2, 3))
  rgb = np.concatenate([np.zeros((1, 3)), a.rgb[1:], extra_rgb]).astype(np.float32)
  nir = np.concatenate([[0.0], a.nir[1:], rng.uniform(0.1, 0.9, 2)]).astype(np.float32)
  heat = np.concatenate([[0.0], a.heat[1:], [rng.uniform(0.0, 0.2), rng.uniform(0.4, 0.7)]])
  return rgb, nir, heat.astype(np.float32)


def render_capture(a: people.Appearance, viewpoint: str, camera: int, rng: np.random.Generator,
                   *, night: bool, crop_scale: float = 1.0) -> dict[str, np.ndarray]:
  """One frame of `camera` showing person `a`: {'RGB': [h,w,3], 'NIR': [h,w], 'TIR': [h,w]}
  uint8 arrays of the same size (the sensors are synchronised and registered)."""
  h, w = _crop_size(viewpoint, camera, rng, crop_scale)
  frame = _body_frame(h, w, a, rng)
  m = draw_materials(frame, a, viewpoint, rng)
  person = m != people.BACKGROUND
  body = AERIAL_BODY if viewpoint == "aerial" else GROUND_BODY
  across = np.clip(frame.u / (body.shoulder_hw * a.width * 1.3), -1.0, 1.0)
  shading = (1.0 - 0.3 * across ** 2) * (1.05 - 0.1 * np.clip(frame.v, 0.0, 1.0))
  rgb_table, nir_table, heat_table = _capture_tables(a, rng)

  background = _background_rgb(frame, viewpoint, camera, rng)
  background_lum = _luminance(background)
  if viewpoint == "aerial" and not night:  # the person's shadow on the ground, seen from above
    shadow = ((frame.u - 0.15) / 0.16) ** 2 + ((frame.v - 0.93) / 0.06) ** 2 < 1.0
    darken = np.where(shadow & ~person, np.float32(0.55), np.float32(1.0))
    background, background_lum = background * darken[..., None], background_lum * darken

  colour = np.where(person[..., None], rgb_table[m] * shading[..., None], background)
  if night:  # weak street light: dark, tinted, washed-out colours
    tint = np.array([1.15, 0.95, 0.7] if rng.uniform() < 0.5 else [0.8, 0.9, 1.15], np.float32)
    lum = _luminance(colour)[..., None]
    colour = (lum + 0.6 * (colour - lum)) * tint * rng.uniform(0.2, 0.4)
  else:
    colour = colour * (rng.uniform(0.8, 1.15) * (1.0 + rng.uniform(-0.06, 0.06, 3)))

  # NIR: vegetation is bright; at night an active illuminator lights the near person far more
  # than the background, and bright garments saturate.
  vegetation = np.clip(3.0 * (background[..., 1] - background[..., [0, 2]].max(axis=-1)), 0, 1)
  nir_background = np.clip(0.75 * background_lum + 0.6 * vegetation, 0.0, 1.0)
  person_gain, background_gain = ((rng.uniform(1.1, 1.5), 0.45) if night
                                  else (rng.uniform(0.85, 1.2),) * 2)
  nir = np.where(person, nir_table[m] * shading * person_gain, nir_background * background_gain)

  # TIR: temperatures, not colours; dark surfaces warm up in the sun; the torso core is warmest.
  ambient = (0.12 + 0.06 * (1.0 - background_lum)) if night else (
      0.28 + 0.18 * (1.0 - background_lum))
  core = 0.08 * (1.0 - across ** 2) * (m == people.TOP)
  temperature = np.where(person, heat_table[m] * (0.9 + 0.1 * shading) + core, ambient)
  thermal = _low_resolution(np.clip(0.1 + 0.8 * temperature + rng.uniform(-0.06, 0.06), 0, 1))
  thermal = _blur(thermal) + rng.normal(0.0, 0.01, size=(1, w)).astype(np.float32)  # column noise

  return {
      "RGB": _to_uint8(colour, rng, 0.05 if night else 0.015),
      "NIR": _to_uint8(_blur(nir), rng, 0.04 if night else 0.02),
      "TIR": _to_uint8(thermal, rng, 0.02),
  }
