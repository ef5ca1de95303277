"""What every benchmark prints about the machine it ran on, and the peak memory it measures."""
import os
import resource
import subprocess


def cpu_model() -> str:
  """lscpu's model name and the CPUs visible: numbers compare only within one machine."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no lscpu)"
  names = [line.split(":", 1)[1].strip() for line in out.splitlines()
           if line.startswith("Model name")]
  return f"{names[0] if names else 'unknown'}, {os.cpu_count()} CPUs visible"


def peak_rss_bytes() -> int:
  """This process's peak resident memory."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
