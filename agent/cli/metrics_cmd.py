"""`devid-agent metrics write`: write the Prometheus textfile (`metrics.textfile`) once.

The daemon writes the same file on its schedule (`agent.wiring.write_metrics`); this is for a
timer or cron without the daemon, and for checking what the file holds. Exit 78 when
`metrics.textfile` is not set.
"""

from __future__ import annotations

import argparse

from agent.cli.config_cmd import add_config_option


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    metrics = subparsers.add_parser("metrics", help="Prometheus textfile for node_exporter")
    actions = metrics.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)
    write = actions.add_parser("write", help="write metrics.textfile once (atomically, 0644)")
    add_config_option(write)
    write.set_defaults(func=run_write)


def run_write(args: argparse.Namespace) -> int:
    from agent.config import config_path, load_config
    from agent.errors import ConfigError
    from agent.wiring import write_metrics

    config = load_config(config_path(args.config))
    path = write_metrics(config)
    if path is None:
        raise ConfigError(
            f"{config.source}: metrics.textfile: not set, so there is no file to write"
        )
    print(f"wrote {path}")
    return 0
