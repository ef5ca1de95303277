#!/bin/bash
# Everything that needs a GPU, in one device call of under 10 minutes (measured on an H200:
# about 2, 4.5 and 1.5 minutes for steps 2, 3 and 4):
#   bash bench/gpu_check.sh            # log to $OUT/gpu_check.log (or /tmp/gpu_check.log)
# 1. the machine: GPU, driver, package versions;
# 2. bench/accelerator.py at the recipe's shapes (batch 192) with the default precision policy,
#    beside the PyTorch peer;
# 3. the tests that say something about a GPU (the step's parity with its NumPy and torch
#    statements, the model's precision forms and cuDNN attention, device augmentation, the
#    losses), run on the GPU instead of the CPU (tests needing 8 devices are left out: one chip);
# 4. the same bench with fp32 activations, ours only.
# Python packages the GPU image lacks travel as wheels in .whl/, fetched beforehand where pip works:
#   pip download --no-deps -d .whl -r bench/gpu_wheels.txt
set -u
log="${OUT:-/tmp}/gpu_check.log"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{
  echo "## machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, jaxlib, flax, optax, numpy, torch, timm, ml_collections
print('python', __import__('sys').version.split()[0], '| jax', jax.__version__, jaxlib.__version__,
      '| flax', flax.__version__, '| optax', optax.__version__, '| numpy', numpy.__version__,
      '| torch', torch.__version__, '| timm', timm.__version__)
print('jax devices:', jax.devices())"
  echo "## accelerator bench, activations=auto, with the peer"
  timeout 200 python3 bench/accelerator.py
  echo "## tests on the GPU"
  # SIGINT on the time limit: pytest then still prints its summary of what ran.
  JAX_PLATFORMS=cuda timeout -s INT 270 python3 -m pytest -q -p no:cacheprovider --no-header -rfE \
    "tests/test_train_step.py::test_two_steps_are_the_reference_sgd_updates_of_the_loss_gradient" \
    "tests/test_train_step.py::test_three_steps_match_torch_sgd_with_coupled_decay_and_clipping" \
    "tests/test_train_step.py::test_bf16_compute_step_tracks_fp32" \
    "tests/test_train_step.py::test_a_batch_of_pixels_steps_as_the_batch_of_their_device_augmented_images" \
    tests/test_model.py tests/test_device_augment.py tests/test_losses.py \
    -k "not devices" 2>&1 | tail -40
  echo "## accelerator bench, activations=float32, ours only"
  timeout 120 python3 bench/accelerator.py --activations float32 --no_peer
} 2>&1 | tee "$log"
