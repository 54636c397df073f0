"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/u2u.py EMBEDDINGS OUT [flags]`` (same flags as ``dynamix u2u``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["u2u", *sys.argv[1:]]))
