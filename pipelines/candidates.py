"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/candidates.py U2U EVENTS OUT [flags]`` (same flags as ``dynamix
candidates``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["candidates", *sys.argv[1:]]))
