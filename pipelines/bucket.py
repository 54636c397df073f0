"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/bucket.py EVENTS OUT [flags]`` (same flags as ``dynamix bucket``).
Joins the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bucket", *sys.argv[1:]]))
