"""`python tests/fault_runner.py STEP llm-jax ARGS...`: the llm-jax command, except that the checkpoint of step
STEP (0: none) stops for ten minutes at the last moment of its asynchronous save, every array and JSON
file written, orbax's rename not yet done, and says so on stdout. A test's kill -9 then lands in the middle
of a save every time instead of by luck."""

import sys
import time

from llm_jax import cli
from llm_jax.run import checkpoint_files


def main() -> int:
  pause_at = int(sys.argv[1])
  real = checkpoint_files.write_manifest

  def paused(directory, step):
    if step == pause_at:
      print(f'fault_runner: pausing the commit of step {step}', flush=True)
      time.sleep(600)
    real(directory, step)

  checkpoint_files.write_manifest = paused
  return cli.main(sys.argv[2:])


if __name__ == '__main__':
  sys.exit(main())
