"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/embed.py EVENTS CHECKPOINT OUT [flags]`` (same flags as ``dynamix embed``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
