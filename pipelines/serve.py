"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/serve.py [args]`` (same arguments as ``dynamix serve``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
