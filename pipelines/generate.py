"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/generate.py OUT [flags]`` (same flags as ``dynamix generate``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
