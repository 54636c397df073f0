"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/histories.py [args]`` (same arguments as ``dynamix histories``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["histories", *sys.argv[1:]]))
