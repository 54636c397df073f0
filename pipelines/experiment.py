"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/experiment.py removal|boosting|all EVENTS SEGMENTS OUT [flags]`` (same
flags as ``dynamix experiment``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
