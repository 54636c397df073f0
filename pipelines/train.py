"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/train.py EVENTS SEGMENTS OUT [flags]`` (same flags as ``dynamix train``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
