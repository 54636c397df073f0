"""Ray-job entry point: ``ray job submit --working-dir . -- python
pipelines/ingest.py EVENTS redis://HOST:PORT/0 [flags]`` (same flags as
``dynamix ingest``)."""

import sys

from dynamix_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
