"""Ray job entrypoint: run every (model, dataset) pair of a YAML study config.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/minilm-scifact.yaml

Inside a job, Ray sets RAY_ADDRESS, so the sweep runs on the job's cluster. Run
directly, it connects to a running local cluster or starts a local Ray. Stopping the
job keeps every finished dim, and submitting it again resumes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger("mrl.jobs.sweep")


class Stopped(Exception):
    """The driver received SIGTERM, which ``ray job stop`` sends before SIGKILL."""


def raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the sweep study described by a YAML config file on Ray.")
    parser.add_argument("--config", type=Path, required=True, help="YAML study config (see jobs/configs/)")
    parser.add_argument("--output", default=None, help="override the config's output: a folder or a URI such as s3://bucket/prefix")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    signal.signal(signal.SIGTERM, raise_stopped)

    from mrl.config import ConfigError, load_study
    from mrl.data import DataError
    from mrl.embed import EmbeddingsError, ModelError
    from mrl.pipeline import ResourceError, run_study

    try:
        study = load_study(args.config, output=args.output)
        run_study(study)
    except (ConfigError, DataError, EmbeddingsError, ModelError, ResourceError, ValueError) as error:
        print(f"mrl: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        log.warning("stopped by %s; finished dims are kept, so submitting the same config again resumes", stop)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
