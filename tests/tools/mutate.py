"""Mutation testing: do the tests catch the faults a reviewer would worry about?

Not part of CI (pytest collects only test_*.py / *_test.py, so it never runs this script). Each
mutation is one small edit to one module: a sign flipped, an off-by-one, a wrong axis, a dropped
term or check. The tree is copied once into a temporary folder; each mutation is applied there, the
mutation's test files run against the copy, and the file is restored. A mutation "survives" when
its tests still pass: a fault of that kind would go unnoticed.

  python tests/tools/mutate.py                   # every mutation, on the working tree
  python tests/tools/mutate.py --source HEAD     # on the committed tree (git archive)
  python tests/tools/mutate.py --only train_step --json /tmp/mutations.json
  python tests/tools/mutate.py --list

A mutation marked harmless is an equivalent mutant (same behaviour, or a difference far below
anything a test could assert): it is run and reported apart, and counts neither way.
"""
import argparse
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
DEFAULT_TIMEOUT_S = 900
# Lines of pytest output kept in the report of a failed baseline.
_TAIL_LINES = 40


@dataclasses.dataclass(frozen=True)
class Mutation:
  """Replace `old` by `new` in `file`, then run `tests`.

  `old` is an exact substring of `file` that occurs once, normally within one line; a fault that
  moves a line (the optimizer chain's order) spans two adjacent ones. `new` may hold several lines.
  `file` is where the module was when the mutation was written; a module that has moved since is
  found by its text (`locate`). `variants` are (old, new) pairs for the same fault in later
  versions of the code, tried in order when `old` no longer matches.
  """
  id: str
  file: str
  old: str
  new: str
  tests: tuple[str, ...]
  description: str
  harmless: bool = False
  variants: tuple[tuple[str, str], ...] = ()


def _mutation(id_, old, new, description, harmless=False, variants=()):
  return Mutation(id_, "", old, new, (), description, harmless, tuple(variants))


def _module(file, tests, *mutations):
  """The mutations of one module, all judged by the same test files."""
  return [dataclasses.replace(m, file=file, tests=tuple(tests)) for m in mutations]


# Paths are those of the packages by layer; a module is also found by its text (`locate`), so the
# list runs on the flat layout of f74f1cd too (the "before" score of issue 8). `old` is the text of
# f74f1cd, `variants` the same fault in code changed since. When a module changes, an `old` may stop
# matching or stop being unique; a run says which before it starts.
MUTATIONS = [
    *_module("uad_jax/training/losses.py", ["tests/test_losses.py"],
        _mutation("losses.ce_sign", "jnp.mean(log_z - true_logit)",
                  "jnp.mean(true_logit - log_z)",
                  "cross-entropy with its sign flipped",
                  variants=[("loss = log_z - true_logit", "loss = true_logit - log_z")]),
        _mutation("losses.gram_factor", "- 2.0 * gram", "- gram",
                  "pairwise distances drop the factor 2 of the cross term"),
        _mutation("losses.wrt_negative_weighting", "_masked_softmax_weights(-dist_an, is_neg)",
                  "_masked_softmax_weights(dist_an, is_neg)",
                  "WRT weights the farthest negatives instead of the closest"),
        _mutation("losses.wrt_margin_swapped",
                  "softplus(furthest_positive - closest_negative)",
                  "softplus(closest_negative - furthest_positive)",
                  "WRT soft margin with d+ and d- swapped"),
        _mutation("losses.proca_wrong_axis", "l2_normalize(jnp.mean(f, axis=2))",
                  "l2_normalize(jnp.mean(f, axis=1))",
                  "ProCA modality centres averaged over identities instead of instances"),
        _mutation("losses.proca_anchor_gradient",
                  "jax.lax.stop_gradient(l2_normalize(jnp.mean(modality_centers, axis=0)))",
                  "l2_normalize(jnp.mean(modality_centers, axis=0))",
                  "ProCA anchors carry gradient (stop_gradient removed)"),
        _mutation("losses.proca_not_per_modality",
                  "jnp.mean(jnp.sum(sq_dist, axis=0)) / num_modalities",
                  "jnp.mean(jnp.sum(sq_dist, axis=0))",
                  "ProCA loss not divided by the number of modalities"),
        _mutation("losses.gpd_tau", "cross_entropy(logits / tau, labels)",
                  "cross_entropy(logits * tau, labels)",
                  "GPD multiplies by the temperature instead of dividing"),
        _mutation("losses.gpd_fallback_inverted", "use_center = row_norms[center_ids] < 1e-6",
                  "use_center = row_norms[center_ids] > 1e-6",
                  "GPD replaces the learned prototypes by anchors, keeps the zero rows"),
        _mutation("losses.gpd_memory_gradient",
                  "protos = at_least_f32(jax.lax.stop_gradient(prototypes))",
                  "protos = at_least_f32(prototypes)",
                  "GPD lets gradient flow into the prototype memory"),
        _mutation("losses.identity_ids_from_nir_block", "[0, :, 0, 0]", "[1, :, 0, 0]",
                  "batch identity ids read from the NIR block: every block holds the same ids",
                  harmless=True),
    ),
    *_module("uad_jax/training/prototypes.py", ["tests/test_losses.py"],
        _mutation("prototypes.momentum_swapped",
                  "(1.0 - momentum) * old + momentum * mean_centers",
                  "momentum * old + (1.0 - momentum) * mean_centers",
                  "memory EMA keeps 0.2 of the old row instead of 0.8"),
        _mutation("prototypes.enabled_ignored", "new = jnp.where(enabled, new, old)",
                  "new = jnp.where(True, new, old)",
                  "memory written even when the step is flagged non-finite"),
        _mutation("prototypes.duplicates_summed",
                  "/ jnp.sum(same_id, axis=1, keepdims=True))", ")",
                  "duplicate anchors summed, not averaged: normalised right after, so the same",
                  harmless=True),
    ),
    *_module("uad_jax/evaluation/metrics.py", ["tests/test_evaluation.py"],
        _mutation("evaluation.sysu_rule_as_market", "return ~same_cam",
                  "return ~(same_id & same_cam)",
                  "sysu camera rule keeps other identities of the query's camera"),
        _mutation("evaluation.market_rule_or", "return ~(same_id & same_cam)",
                  "return ~(same_id | same_cam)",
                  "market camera rule drops every same-identity item"),
        _mutation("evaluation.ap_hit_number_from_zero", "jnp.arange(1, ranks.shape[1] + 1)",
                  "jnp.arange(0, ranks.shape[1])",
                  "AP counts hits from 0 instead of 1"),
        _mutation("evaluation.inp_not_hardest", "jnp.maximum(num_pos - 1, 0)",
                  "jnp.maximum(num_pos - 2, 0)",
                  "INP uses the second-hardest positive"),
        _mutation("evaluation.ties_to_higher_index",
                  "fold(gallery_index)[None, None] < pos_idx[:, :, None, None]",
                  "fold(gallery_index)[None, None] > pos_idx[:, :, None, None]",
                  "exact distance ties go to the higher gallery index"),
        _mutation("evaluation.cmc_strict", "first_rank[:, None] <= np.arange(1, max_rank + 1)",
                  "first_rank[:, None] < np.arange(1, max_rank + 1)",
                  "CMC@r requires the first hit strictly before rank r"),
        _mutation("evaluation.normalize_ignored",
                  "return l2_normalize(feats) if normalize else feats", "return feats",
                  "features never L2-normalised"),
        _mutation("evaluation.distance_sign", "[-2.0 * g_feats, sq_norms",
                  "[2.0 * g_feats, sq_norms",
                  "distance expansion |q|²+|g|²+2q·g"),
        _mutation("evaluation.top_k_boundary", "jnp.sum(ranks_in_all <= top_k, axis=1)",
                  "jnp.sum(ranks_in_all < top_k, axis=1)",
                  "truncated mode retrieves only k−1 items"),
        _mutation("evaluation.first_block_only", "start < most,", "start < _POSITIVE_BLOCK,",
                  "positives past the first block of 16 are never ranked"),
    ),
    *_module("uad_jax/training/train_step.py", ["tests/test_train_step.py"],
        _mutation("train_step.update_sign", "p + jnp.where(finite, u, 0)",
                  "p - jnp.where(finite, u, 0)",
                  "parameters move against the optimizer's update (gradient ascent)"),
        _mutation("train_step.opt_state_unprotected",
                  "jax.tree.map(keep_old_unless_finite, opt_state, state.opt_state)", "opt_state",
                  "momentum buffers updated on a skipped (non-finite) step"),
        _mutation("train_step.batch_stats_unprotected",
                  "jax.tree.map(keep_old_unless_finite, batch_stats, state.batch_stats)",
                  "batch_stats",
                  "BNNeck running statistics updated on a skipped step"),
        _mutation("train_step.rng_unprotected", "rng=keep_old_unless_finite(rng, state.rng)",
                  "rng=rng",
                  "RNG key advanced on a skipped step"),
        _mutation("train_step.finite_ignores_grad_norm",
                  'finite = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)',
                  'finite = jnp.isfinite(terms["total"])',
                  "a finite loss with non-finite gradients is applied"),
        _mutation("train_step.accuracy_inverted", "jnp.argmax(logits, axis=-1) == labels",
                  "jnp.argmax(logits, axis=-1) != labels",
                  "id_accuracy metric reports the error rate"),
        _mutation("train_step.proca_unweighted", 'total += cfg.proca_weight * terms["proca"]',
                  'total += terms["proca"]',
                  "ProCA term added without its weight"),
        _mutation("train_step.gpd_weight_on_proca", 'total += cfg.gpd_weight * terms["gpd"]',
                  'total += cfg.gpd_weight * terms["proca"]',
                  "the GPD slot of the total adds the ProCA term again"),
        _mutation("train_step.skipped_step_not_counted",
                  "step=state.step + 1", "step=state.step + finite.astype(state.step.dtype)",
                  "a skipped step is not counted: schedule and checkpoints drift from the data"),
        _mutation("train_step.memory_unprotected", "enabled=finite),", "enabled=True),",
                  "prototype memory updated on a skipped step"),
        _mutation("train_step.dropout_rng_never_split",
                  "rng, dropout_rng = jax.random.split(state.rng)",
                  "rng, dropout_rng = state.rng, state.rng",
                  "the same drop-path masks every step (the key never advances)"),
        _mutation("train_step.frozen_grad_in_norm",
                  "g if l != optim.FROZEN else jnp.zeros_like(g)", "g",
                  "grad_norm (metric and finiteness gate) includes the frozen BNNeck bias"),
        _mutation("train_step.first_group_only", "terms = {k: jnp.mean(v) for k, v in",
                  "terms = {k: v[0] for k, v in",
                  "loss terms of replica group 0 only, not the mean over groups"),
    ),
    *_module("uad_jax/training/optim.py", ["tests/test_train_step.py"],
        # The chain's state keeps its layout (the trace stays at index 3), so only the numbers
        # can tell this one apart.
        _mutation("optim.decay_after_momentum",
                  "optax.masked(optax.add_decayed_weights(optim_config.weight_decay), trained),\n"
                  "      optax.trace(decay=optim_config.momentum, nesterov=False),",
                  "optax.masked(optax.identity(), trained),\n"
                  "      optax.trace(decay=optim_config.momentum, nesterov=False),\n"
                  "      optax.masked(optax.add_decayed_weights(optim_config.weight_decay), "
                  "trained),",
                  "weight decay added after momentum instead of before (kept out of the buffer)",
                  variants=[(
                      "direction = [decay, optax.trace(decay=optim_config.momentum, "
                      "nesterov=False)]",
                      "direction = [optax.masked(optax.identity(), trained), "
                      "optax.trace(decay=optim_config.momentum, nesterov=False), decay]")]),
        _mutation("optim.decay_after_momentum_swapped",
                  "optax.masked(optax.add_decayed_weights(optim_config.weight_decay), trained),\n"
                  "      optax.trace(decay=optim_config.momentum, nesterov=False),",
                  "optax.trace(decay=optim_config.momentum, nesterov=False),\n"
                  "      optax.masked(optax.add_decayed_weights(optim_config.weight_decay), "
                  "trained),",
                  "the same fault as a plain swap of the two lines (moves the trace's state)",
                  variants=[(
                      "direction = [decay, optax.trace(decay=optim_config.momentum, "
                      "nesterov=False)]",
                      "direction = [optax.trace(decay=optim_config.momentum, nesterov=False), "
                      "decay]")]),
        _mutation("optim.bias_lr_not_doubled", "BIAS: schedule(base * optim_config.bias_lr_factor)",
                  "BIAS: schedule(base)",
                  "bias group trains at the weight learning rate"),
        _mutation("optim.nothing_frozen", 'FROZEN_PARAMS = ("bnneck/bias",)', "FROZEN_PARAMS = ()",
                  "the BNNeck bias is trained"),
        _mutation("optim.warmup_includes_boundary",
                  "jnp.where(epoch < warmup_epochs, warm, cosine)",
                  "jnp.where(epoch <= warmup_epochs, warm, cosine)",
                  "warm-up formula used one epoch too long"),
        _mutation("optim.epoch_of_step_left", 'jnp.searchsorted(ends, step, side="right") + 1',
                  'jnp.searchsorted(ends, step, side="left") + 1',
                  "the last step of an epoch gets the next epoch's learning rate"),
        _mutation("optim.nesterov", "nesterov=False", "nesterov=True",
                  "Nesterov momentum instead of torch's plain SGD momentum"),
        _mutation("optim.clip_scales_up", "jnp.minimum(1.0, max_norm", "jnp.maximum(1.0, max_norm",
                  "gradient clipping scales small gradients up to the max norm"),
        _mutation("optim.clip_epsilon", "(optax.global_norm(updates) + 1e-6)",
                  "(optax.global_norm(updates) + 1e-7)",
                  "clip epsilon 1e-7 instead of torch's 1e-6: negligible", harmless=True),
    ),
    *_module("uad_jax/data/input_pipeline.py", ["tests/test_input_pipeline.py"],
        _mutation("input_pipeline.global_position_seed",
                  "image_rng(self._sampler.seed, epoch, epoch_position)",
                  "image_rng(self._sampler.seed, epoch,\n"
                  "                             step * self._sampler.shape.step_rows + row)",
                  "augmentation seeded by the image's position in the whole run, not in its epoch"),
        _mutation("input_pipeline.process_position_seed",
                  "image_rng(self._sampler.seed, epoch, epoch_position)",
                  "image_rng(self._sampler.seed, epoch, int(position))",
                  "augmentation seeded by the position in this process's stream: a multi-process "
                  "run augments differently from a single-process one"),
        _mutation("input_pipeline.epoch_fixed_in_seed",
                  "image_rng(self._sampler.seed, epoch, epoch_position)",
                  "image_rng(self._sampler.seed, 0, epoch_position)",
                  "every epoch augmented identically (epoch fixed at 0 in the seed)"),
        _mutation("input_pipeline.process_offset_dropped",
                  "row = self._process_offset + local_row", "row = local_row",
                  "every process loads the first slice of the global batch"),
        _mutation("input_pipeline.epoch_lookup_left",
                  'np.searchsorted(self._first_step, step, side="right")) - 1',
                  'np.searchsorted(self._first_step, step, side="left")) - 1',
                  "first step of each epoch looked up in the previous epoch"),
        _mutation("input_pipeline.step_not_relative", "step_in_epoch = step - int(",
                  "step_in_epoch = step + 0 * int(",
                  "step index not made relative to its epoch"),
        _mutation("input_pipeline.eval_padding_off_by_one", "if index >= self._size:",
                  "if index > self._size:",
                  "eval padding starts one row late (reads past the split)"),
        _mutation("input_pipeline.eval_tail_dropped",
                  "num_batches = -(-len(source) // batch_size)",
                  "num_batches = len(source) // batch_size",
                  "the last, partial eval batch is dropped"),
        _mutation("input_pipeline.num_classes_off_by_one",
                  "num_classes=int(metadata.labels.max()) + 1",
                  "num_classes=int(metadata.labels.max())",
                  "classifier sized one identity short"),
    ),
    *_module("uad_jax/data/augment.py", ["tests/test_augment.py"],
        _mutation("augment.erase_top_off_by_one", "rng.integers(0, height - h + 1)",
                  "rng.integers(0, height - h)",
                  "erase box never touches the bottom edge"),
        _mutation("augment.flip_prob", "FLIP_PROB = 0.5", "FLIP_PROB = 0.6",
                  "horizontal flip with probability 0.6"),
        _mutation("augment.crop_range_off_by_one", "top = int(rng.integers(0, 2 * padding + 1))",
                  "top = int(rng.integers(0, 2 * padding))",
                  "crop never takes the lowest window of the padded image"),
        _mutation("augment.std_multiplied", "x /= np.float32(PIXEL_STD)",
                  "x *= np.float32(PIXEL_STD)",
                  "normalisation multiplies by the std"),
        _mutation("augment.erase_decision_inverted", "if rng.random() >= prob:",
                  "if rng.random() < prob:",
                  "random erasing applied with probability 1 − p"),
        _mutation("augment.erase_accepts_full_size", "if h < height and w < width:",
                  "if h <= height and w <= width:",
                  "erase box as tall or wide as the image accepted"),
        _mutation("augment.train_resize_bilinear", "image.resize((width, height), Image.BICUBIC)",
                  "image.resize((width, height), Image.BILINEAR)",
                  "train resize bilinear instead of bicubic"),
        _mutation("augment.flip_vertical", "pixels = pixels[:, ::-1]", "pixels = pixels[::-1]",
                  "vertical instead of horizontal flip"),
        _mutation("augment.crop_shift_mirrored", "dy, dx = top - padding, left - padding",
                  "dy, dx = padding - top, padding - left",
                  "crop window mirrored about the centre",
                  variants=[("flip_shift(pixels, flip, top - padding, left - padding)",
                             "flip_shift(pixels, flip, padding - top, padding - left)")]),
        _mutation("augment.erase_hw_swapped", "aspect = math.exp(rng.uniform(*log_aspect))",
                  "aspect = math.exp(-rng.uniform(*log_aspect))",
                  "h uses /aspect and w ·aspect: the log-aspect range is symmetric, same boxes",
                  harmless=True),
        _mutation("augment.shared_stream", "AUGMENT_STREAM = 1", "AUGMENT_STREAM = 0",
                  "augmentation's seed word equals the sampler's: the seed tuples differ in "
                  "length, so the streams still differ", harmless=True),
    ),
    *_module("uad_jax/data/augment.py", ["tests/test_device_augment.py"],
        _mutation("augment.params_draw_first",
                  "flip, top, left = draw_crop(rng, flip_prob, padding)\n"
                  "  box = draw_erase(height, width, rng, erase_prob) or (0, 0, 0, 0)",
                  "rng.random()\n  flip, top, left = draw_crop(rng, flip_prob, padding)\n"
                  "  box = draw_erase(height, width, rng, erase_prob) or (0, 0, 0, 0)",
                  "the device's parameters draw something before the host's draws: other crops "
                  "and boxes than the host's"),
    ),
    *_module("uad_jax/data/device_augment.py", ["tests/test_device_augment.py"],
        _mutation("device_augment.crop_not_flipped",
                  "cols = jnp.where(flip, width - 1 - cols, cols)", "cols = cols + 0 * flip",
                  "the device never flips"),
        _mutation("device_augment.box_one_row_taller", "(rows >= top) & (rows < top + height)",
                  "(rows >= top) & (rows <= top + height)",
                  "erase box one row taller than the host's"),
        _mutation("device_augment.noise_seed_ignored", "jax.random.key(seed)",
                  "jax.random.key(0 * seed)", "every erased box holds the same noise"),
        _mutation("device_augment.padding_not_zero", "moved, jnp.zeros((), pixels.dtype))",
                  "moved, jnp.full((), 255, pixels.dtype))", "crop padding filled with white"),
        _mutation("device_augment.resize_vertical_first",
                  "  rows = _resample(pixels.swapaxes(0, 1), x_starts[raw_w], x_weights[raw_w])"
                  ".swapaxes(0, 1)\n  return _resample(rows, y_starts[raw_h], y_weights[raw_h])",
                  "  rows = _resample(pixels, y_starts[raw_h], y_weights[raw_h])\n"
                  "  return _resample(rows.swapaxes(0, 1), x_starts[raw_w], x_weights[raw_w])"
                  ".swapaxes(0, 1)",
                  "the device resizes vertically first: other roundings of the middle image"),
        _mutation("device_augment.resize_unrounded",
                  "starts.shape[0], *pixels.shape[1:]), pil_bicubic.ROUNDING,",
                  "starts.shape[0], *pixels.shape[1:]), 0,",
                  "the resize's sums start at 0: truncated instead of rounded"),
        _mutation("device_augment.resize_unclipped",
                  "jnp.clip(sums >> pil_bicubic.PRECISION_BITS, 0, 255)",
                  "(sums >> pil_bicubic.PRECISION_BITS)",
                  "overshooting sums wrap around instead of clipping to 0..255"),
    ),
    *_module("uad_jax/data/pil_bicubic.py",
             ["tests/test_pil_bicubic.py", "tests/test_device_augment.py"],
        _mutation("pil_bicubic.kernel_a", "a = -0.5", "a = -0.75",
                  "the cubic kernel of OpenCV (a = −0.75) instead of Pillow's"),
        _mutation("pil_bicubic.weights_truncated", "np.trunc(scaled + 0.5)", "np.trunc(scaled)",
                  "positive fixed-point weights truncated instead of rounded"),
        _mutation("pil_bicubic.no_antialias", "filterscale = max(scale, 1.0)",
                  "filterscale = 1.0", "the kernel is not widened when shrinking"),
    ),
    *_module("uad_jax/data/augment.py", ["tests/test_device_augment.py"],
        _mutation("augment.raw_size_transposed",
                  "return pixels, np.array([image.height, image.width], np.int32)",
                  "return pixels, np.array([image.width, image.height], np.int32)",
                  "the raw image's size travels as (w, h)"),
    ),
    *_module("uad_jax/data/sampler.py", ["tests/test_sampler.py"],
        # One line that rounds up and pads the last step with the epoch's first batches, so the
        # reshape below still runs.
        _mutation("sampler.steps_round_up", "steps = len(batches) // self.shape.replicas",
                  "steps = -(-len(batches) // self.shape.replicas); batches = np.resize("
                  "batches, (steps * self.shape.replicas, batches.shape[1]))",
                  "step count rounded up (tail padded by wrapping) instead of dropping the tail"),
        _mutation("sampler.need_rounded_up", "self.need = most - most % k",
                  "self.need = most + (-most) % k",
                  "images per modality rounded up to a multiple of K"),
        _mutation("sampler.pool_stops_early", "while len(pool) >= p:", "while len(pool) > p:",
                  "epoch ends while P identities still have groups"),
        _mutation("sampler.identities_with_replacement",
                  "rng.choice(len(pool), size=p, replace=False)",
                  "rng.choice(len(pool), size=p, replace=True)",
                  "a batch may draw the same identity twice"),
        _mutation("sampler.draw_with_replacement",
                  "rng.choice(records, size=need, replace=False)",
                  "rng.choice(records, size=need, replace=True)",
                  "modalities with enough images sample with replacement"),
        _mutation("sampler.extras_with_replacement",
                  "rng.choice(records, extra, replace=False)",
                  "rng.choice(records, extra, replace=True)",
                  "tiling extras may repeat a record"),
        _mutation("sampler.identity_major_rows", "batches.transpose(0, 2, 1, 3).reshape(",
                  "batches.reshape(",
                  "batch rows identity-major instead of modality-major"),
        _mutation("sampler.epoch_not_in_seed",
                  "default_rng((SAMPLER_STREAM, int(seed), int(epoch)))",
                  "default_rng((SAMPLER_STREAM, int(seed)))",
                  "every epoch draws the same batches"),
    ),
    *_module("uad_jax/evaluation/protocols.py", ["tests/test_evaluation_protocols.py"],
        _mutation("protocols.scenario_viewpoint_major",
                  "self.modalities * len(VIEWPOINTS) + self.viewpoints",
                  "self.viewpoints * len(MODALITIES) + self.modalities",
                  "scenario index viewpoint-major: cells named RGB-aerial hold NIR-ground, …"),
        _mutation("protocols.viewpoint_keeps_same_view", "keep=lambda a, b: a != b",
                  "keep=lambda a, b: True",
                  "viewpoint protocol includes ground→ground and aerial→aerial"),
        _mutation("protocols.cross_spectral_diagonal", "if len(set(name.split(ARROW))) == 2}",
                  "if len(set(name.split(ARROW))) >= 1}",
                  "cross-spectral cells include same-modality cells"),
        _mutation("protocols.camera_rule_dropped", "camera_rule=camera_rule, top_k=top_k,",
                  'camera_rule="sysu", top_k=top_k,',
                  "cells always evaluated with the sysu camera rule"),
        _mutation("protocols.top_k_dropped", "top_k=top_k, max_rank=max_rank,",
                  "top_k=None, max_rank=max_rank,",
                  "truncated evaluation silently exact"),
    ),
    # test_pretrained.py compares the forward pass with torch's features, so it guards the ViT too.
    *_module("uad_jax/models/vit.py", ["tests/test_model.py", "tests/test_pretrained.py"],
        _mutation("vit.drop_path_reversed", "np.linspace(0.0, self.stochastic_depth, shape.depth)",
                  "np.linspace(self.stochastic_depth, 0.0, shape.depth)",
                  "stochastic-depth rates decrease over the blocks"),
        _mutation("vit.attention_unscaled", "qkv[0] * head_dim**-0.5", "qkv[0]",
                  "attention logits not scaled by 1/√d"),
        _mutation("vit.softmax_wrong_axis", "self.dtype), axis=-1)", "self.dtype), axis=-2)",
                  "attention softmax over queries instead of keys"),
        _mutation("vit.pos_embed_dropped", "with_logical_constraint(x + pos,",
                  "with_logical_constraint(x,",
                  "position embedding never added"),
        _mutation("vit.first_patch_not_cls", '_layer_norm("norm")(x[:, 0])',
                  '_layer_norm("norm")(x[:, 1])',
                  "output taken from the first patch token instead of CLS"),
        _mutation("vit.layernorm_eps", "epsilon=1e-6", "epsilon=1e-5",
                  "LayerNorm eps 1e-5 (Flax/torch default) instead of ViT's 1e-6"),
        _mutation("vit.gelu_jvp_drops_pdf", "(cdf + x * pdf) * t", "cdf * t",
                  "GELU derivative drops its x·φ(x) term"),
        _mutation("vit.drop_path_per_token", "broadcast_dims=(1, 2)", "broadcast_dims=(2,)",
                  "stochastic depth drops tokens, not whole samples"),
    ),
    *_module("uad_jax/models/reid_model.py", ["tests/test_model.py"],
        _mutation("reid_model.running_var_biased", " * n / max(n - 1, 1)", "",
                  "BNNeck tracks the biased batch variance"),
        _mutation("reid_model.bn_momentum_swapped",
                  "(1 - m) * ra_mean.value + m * jnp.mean(mean, axis=(0, 1))",
                  "m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=(0, 1))",
                  "running mean keeps 0.1 of the old value instead of 0.9"),
        _mutation("reid_model.bn_not_per_group", "groups = x.reshape(self.num_groups, -1, d)",
                  "groups = x.reshape(1, -1, d)",
                  "BNNeck statistics over the whole global batch (SyncBN)"),
        _mutation("reid_model.classifier_on_pre_bn", ")(bn_feat)", ")(global_feat)",
                  "classifier reads the pre-BN feature: the BNNeck does nothing"),
    ),
    *_module("uad_jax/models/precision.py", ["tests/test_model.py"],
        _mutation("precision.matmul_not_low_precision",
                  "return _dot(x.astype(dtype), w.astype(dtype), ((x.ndim - 1,), (0,)))",
                  "return _dot(x, w, ((x.ndim - 1,), (0,)))",
                  "bf16 matmul silently computed in fp32"),
        _mutation("precision.dw_dtype", "dw = _dot(xl, gl, (lead, lead)).astype(w_dtype)",
                  "dw = _dot(xl, gl, (lead, lead)).astype(dtype)",
                  "weight cotangent returned in the compute dtype"),
    ),
    *_module("uad_jax/training/loop.py", ["tests/test_train_loop.py",
                                          "tests/test_run_resilience.py"],
        _mutation("train.camera_rule_ignored", "camera_rule=config.camera_rule)",
                  'camera_rule="sysu")',
                  "evaluation ignores config.camera_rule",
                  # Since 71b7f91 the raw-pixel baselines take the rule too; this is the model's.
                  variants=[("gallery.model,\n" + " " * 41 + "camera_rule=config.camera_rule)",
                             'gallery.model,\n' + " " * 41 + 'camera_rule="sysu")')]),
        _mutation("train.history_drops_last_epoch", 'if h["epoch"] <= done]',
                  'if h["epoch"] < done]',
                  "a resumed run forgets the history of the last completed epoch",
                  variants=[('if h["epoch"] <= completed_epochs]',
                             'if h["epoch"] < completed_epochs]')]),
        _mutation("train.data_state_not_restored", "train_iter.set_state(data_state)",
                  "del data_state",
                  "a resumed run restarts the data stream from the beginning",
                  variants=[("train_iter.set_state(restored.data_state)", "pass")]),
        _mutation("train.final_eval_dropped",
                  "epoch % config.eval_every_epochs == 0 or epoch == config.optim.epochs",
                  "epoch % config.eval_every_epochs == 0",
                  "no evaluation after the last epoch unless it falls on eval_every_epochs"),
    ),
    *_module("uad_jax/models/pretrained.py", ["tests/test_pretrained.py"],
        _mutation("pretrained.resize_align_corners",
                  "(np.arange(size) + 0.5) * (n_in / size) - 0.5",
                  "np.arange(size) * (n_in / size)",
                  "position grid resized without half-pixel centres"),
        _mutation("pretrained.resize_not_clamped",
                  "np.maximum((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0.0)",
                  "((np.arange(size) + 0.5) * (n_in / size) - 0.5)",
                  "resize source coordinate not clamped at 0"),
        _mutation("pretrained.google_qkv_order",
                  'kernels = [arrays[names[(p, "kernel")]] for p in ("query", "key", "value")]',
                  'kernels = [arrays[names[(p, "kernel")]] for p in ("key", "query", "value")]',
                  "Google q and k kernels swapped when fused"),
        _mutation("pretrained.timm_patch_kernel_order",
                  "x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])",
                  "x.transpose(3, 2, 1, 0).reshape(-1, x.shape[0])",
                  "timm patch kernel flattened (pw, ph, c) instead of (ph, pw, c)"),
    ),
]


# ------------------------------------------------------------------------------ the tree copy

def copy_tree(source: str | None, dest: pathlib.Path) -> None:
  """The working tree (tracked and untracked-not-ignored files), or commit `source`, into dest."""
  if source is None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
      path = REPO / name
      if path.is_file():  # a tracked file deleted in the working tree is listed too
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / name)
    return
  archive = subprocess.run(["git", "archive", "--format=tar", source], cwd=REPO, check=True,
                           capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(dest, filter="data")


def _environment() -> dict:
  env = dict(os.environ)
  # tests/conftest.py sets the fake device count; an inherited XLA_FLAGS would change the run.
  env.pop("XLA_FLAGS", None)
  # No .pyc in the copy: a mutant and its restored original can share a size and an mtime second,
  # and Python would then run the mutant's cached bytecode.
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  return env


def run_pytest(tree: pathlib.Path, tests, timeout_s: float, stop_at_first=True):
  """(exit code or None on timeout, output, seconds) of pytest on `tests` inside `tree`."""
  command = PYTEST + list(tests) if stop_at_first else [a for a in PYTEST if a != "-x"] + list(
      tests)
  start = time.perf_counter()
  # A session of its own, so a timeout also ends the Grain worker processes the tests start.
  process = subprocess.Popen(command, cwd=tree, env=_environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    output, _ = process.communicate(timeout=timeout_s)
    code = process.returncode
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    code = None
  return code, output, time.perf_counter() - start


def _failures(output: str) -> list[str]:
  """The `path::test` of every FAILED / ERROR line of pytest's short summary."""
  return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)


# --------------------------------------------------------------------------------- the checks

def locate(tree: pathlib.Path, m: Mutation) -> Mutation | None:
  """`m` as it applies to `tree`: the first of its (old, new) pairs whose `old` occurs exactly
  once in `m.file`, or else in the one module of the package that holds it; None if none does."""
  modules = sorted((tree / "uad_jax").rglob("*.py"))
  for old, new in ((m.old, m.new), *m.variants):
    declared = tree / m.file
    if declared.is_file() and declared.read_text().count(old) == 1:
      return dataclasses.replace(m, old=old, new=new)
    holders = [path for path in modules if old in path.read_text()]
    if len(holders) == 1 and holders[0].read_text().count(old) == 1:
      return dataclasses.replace(m, file=holders[0].relative_to(tree).as_posix(), old=old,
                                 new=new)
  return None


def check_mutations(tree: pathlib.Path, mutations) -> list[Mutation]:
  """The mutations located in `tree`, each `old` once in its file and each mutant compiling;
  exits naming every mutation that is not."""
  problems, located = [], []
  for m in mutations:
    for test in m.tests:
      if not (tree / test).is_file():
        problems.append(f"{m.id}: test file {test} does not exist")
    found = locate(tree, m)
    if found is None:
      count = (tree / m.file).read_text().count(m.old) if (tree / m.file).is_file() else 0
      problems.append(f"{m.id}: `{m.old}` occurs {count} times in {m.file}, not once, and no "
                      f"variant occurs once in one module")
      continue
    try:
      compile((tree / found.file).read_text().replace(found.old, found.new), found.file, "exec")
    except SyntaxError as error:
      problems.append(f"{m.id}: the mutant of {found.file} does not compile: {error}")
    located.append(found)
  ids = [m.id for m in mutations]
  problems += [f"{i}: id used more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
  if problems:
    sys.exit("mutations that cannot be applied:\n  " + "\n  ".join(problems))
  return located


def check_imports_from(tree: pathlib.Path) -> None:
  """The tests in the copy must import the copy's modules, not an installed uad_jax."""
  found = subprocess.run([sys.executable, "-c", "import uad_jax; print(uad_jax.__file__)"],
                         cwd=tree, env=_environment(), capture_output=True, text=True)
  path = pathlib.Path(found.stdout.strip() or "?").resolve()
  if found.returncode or tree.resolve() not in path.parents:
    sys.exit(f"uad_jax in the copy imports from {path}, not from {tree}: {found.stderr}")


def check_baseline(tree: pathlib.Path, tests, timeout_s: float) -> float:
  """Runs the unmutated test files once; a failing baseline makes every score meaningless."""
  print(f"baseline: {len(tests)} test files on the unmutated tree …", flush=True)
  code, output, seconds = run_pytest(tree, tests, timeout_s * len(tests), stop_at_first=False)
  if code != 0:
    failing = sorted({f.split("::")[0] for f in _failures(output)}) or list(tests)
    tail = "\n".join(output.splitlines()[-_TAIL_LINES:])
    why = "timed out" if code is None else f"exit {code}"
    sys.exit(f"{tail}\n\nthe unmutated tests do not pass ({why}); failing files:\n  "
             + "\n  ".join(failing))
  print(f"baseline passes ({seconds:.0f} s)\n", flush=True)
  return seconds


# ------------------------------------------------------------------------------------ the run

def run_mutation(tree: pathlib.Path, m: Mutation, timeout_s: float) -> dict:
  path = tree / m.file
  original = path.read_text()
  path.write_text(original.replace(m.old, m.new))
  try:
    code, output, seconds = run_pytest(tree, m.tests, timeout_s)
  finally:
    path.write_text(original)
  if code is None:
    outcome = "caught (timeout)"
  elif code == 0:
    outcome = "survived"
  elif code == 1:
    outcome = "caught"
  else:  # collection or internal error: the mutant broke an import, still a failing suite
    outcome = f"caught (pytest exit {code})"
  failures = _failures(output)
  return {"id": m.id, "file": m.file, "tests": list(m.tests), "description": m.description,
          "harmless": m.harmless, "outcome": outcome, "caught": outcome != "survived",
          "seconds": round(seconds, 1), "failed_test": failures[0] if failures else None}


def _print_row(result: dict) -> None:
  label = result["outcome"] + (" [harmless]" if result["harmless"] else "")
  print(f"{result['id']:<42} {result['file']:<32} {label:<28} {result['seconds']:6.1f} s  "
        f"{result['description']}", flush=True)


def summarise(results: list[dict]) -> dict:
  counted = [r for r in results if not r["harmless"]]
  harmless = [r for r in results if r["harmless"]]
  return {"caught": sum(r["caught"] for r in counted), "total": len(counted),
          "survivors": [r["id"] for r in counted if not r["caught"]],
          "harmless": [r["id"] for r in harmless],
          # An equivalent mutant that fails a test points at a test asserting more than the spec.
          "harmless_but_caught": [r["id"] for r in harmless if r["caught"]]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default=None,
                      help="git revision to test (copied with git archive); default: the working "
                           "tree, tracked and untracked-not-ignored files")
  parser.add_argument("--only", default=None,
                      help="run only the mutations whose id or file contains one of these "
                           "comma-separated substrings")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                      help="seconds per mutation; a timeout counts as caught, labelled so")
  parser.add_argument("--json", default=None, help="write the results to this path")
  args = parser.parse_args(argv)

  mutations = [m for m in MUTATIONS
               if args.only is None
               or any(part in m.id or part in m.file for part in args.only.split(","))]
  if not mutations:
    sys.exit(f"no mutation matches --only {args.only!r}")
  if args.list:
    for m in mutations:
      print(f"{m.id:<42} {m.file:<32} {' '.join(m.tests):<40} "
            f"{'[harmless] ' if m.harmless else ''}{m.description}")
    print(f"{len(mutations)} mutations")
    return 0

  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="uad_mutate_") as temp:
    tree = pathlib.Path(temp)
    copy_tree(args.source, tree)
    mutations = check_mutations(tree, mutations)
    check_imports_from(tree)
    tests = sorted({t for m in mutations for t in m.tests})
    # The baseline is no mutation: --timeout does not bound it, only a generous per-file limit.
    baseline_s = check_baseline(tree, tests, max(args.timeout, DEFAULT_TIMEOUT_S))
    results = []
    for m in mutations:
      results.append(run_mutation(tree, m, args.timeout))
      _print_row(results[-1])
  total_s = time.perf_counter() - start

  summary = summarise(results)
  print(f"\ncaught {summary['caught']} of {summary['total']} "
        f"({len(summary['harmless'])} harmless run apart) in {total_s / 60:.1f} min")
  if summary["survivors"]:
    print("survivors (tests still pass):\n  " + "\n  ".join(summary["survivors"]))
  if summary["harmless_but_caught"]:
    print("harmless mutations that a test still fails on:\n  "
          + "\n  ".join(summary["harmless_but_caught"]))
  if args.json:
    report = {"source": args.source or "working tree", "only": args.only,
              "timeout_s": args.timeout, "baseline_s": round(baseline_s, 1),
              "total_s": round(total_s, 1), **summary, "results": results}
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
