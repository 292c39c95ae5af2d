"""Command line: ``gitlab-producer run|check-config|backfill|worker|status|...``.

Every command that works on GitLab, Redis or Kafka goes through :func:`run_command`: its
start-up checks (:mod:`gitlab_producer.startup`) and any other :class:`ConfigError` end the
process with exit code 2 and one line naming the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn

import orjson

from gitlab_producer.config import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings
from gitlab_producer.logs import configure

EXIT_CONFIG = 2


def _settings(args: argparse.Namespace) -> Settings:
    path = DEFAULT_CONFIG_PATH if args.config is None else Path(args.config)
    try:
        if args.config is not None and not path.exists():  # only the default is optional
            raise ConfigError(f"--config: {path} does not exist")
        return load_settings(path)
    except ConfigError as exc:
        config_exit(exc)


def config_exit(exc: ConfigError) -> NoReturn:
    """One line naming the variable on stderr, exit code 2."""
    print(f"config error: {exc}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG) from None


def run_command(main: Coroutine[Any, Any, int], tune_gc: bool = False) -> int:
    """Run a command's coroutine (:func:`run_async`); a :class:`ConfigError` it raises (found
    at start: a port in use, a password or database Redis refuses, a file that cannot be
    opened) exits 2 with one line."""
    try:
        return run_async(main, tune_gc=tune_gc)
    except ConfigError as exc:
        config_exit(exc)


def cmd_run(args: argparse.Namespace) -> int:
    from gitlab_producer.service import Service

    settings = _settings(args)
    configure(settings.log_level)
    main = Service(settings).run(once=args.once)
    if settings.sync_objects:
        from gitlab_producer.objects.objsync import backfill_then

        main = backfill_then(settings, main)
    # Fewer, longer collections speed up catch-up rounds; a latency-bound webhook receiver
    # keeps the default collector (a precaution: bench/RESULTS.md, the measurements were not
    # conclusive either way).
    return run_command(main, tune_gc=not settings.webhook_port)


def run_async(main: Coroutine[Any, Any, int], tune_gc: bool = False) -> int:
    """Run on uvloop where it is installed (measured faster; see bench/RESULTS.md)."""
    if tune_gc:
        # Pages make many short-lived containers; the default gen-0 threshold (700) runs the
        # collector thousands of times per round for little: the sync builds no cycles.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sys.stdout.buffer.write(orjson.dumps(settings.redacted(), option=orjson.OPT_INDENT_2))
    sys.stdout.write("\n")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from gitlab_producer.artifact_paths import UnsafePathError
    from gitlab_producer.capture import CaptureRefused
    from gitlab_producer.gitlab.errors import GitLabError
    from gitlab_producer.service import Service
    from gitlab_producer.startup import start_checks

    settings = _settings(args)
    configure(settings.log_level)

    async def main() -> int:
        (await start_checks(settings)).close()
        service = Service(settings)
        client = service.gitlab_client()
        capturer = service.capturer(client)
        try:
            stored = await capturer.capture(args.project, args.ref, args.as_user)
        except (CaptureRefused, GitLabError, UnsafePathError) as exc:
            print(f"capture refused or failed: {exc}", file=sys.stderr)
            return 1
        finally:
            await capturer.sink.close()
            await client.aclose()
        for item in stored:
            print(orjson.dumps(item.__dict__).decode())
        return 0

    return run_command(main())


def cmd_backfill(args: argparse.Namespace) -> int:
    from gitlab_producer.objects.backfill import Backfill

    settings = _settings(args)
    configure(settings.log_level)
    backfill = Backfill(settings)
    if args.command == "worker":
        return run_command(backfill.work())
    if args.command == "status":
        return run_command(backfill.status())
    # As a catch-up round (cmd_run): fewer, longer collections; the import's pages make
    # many short-lived containers (278 collections of the default gen-0 threshold in a
    # 2,000-project backfill of projects and issues).
    return run_command(backfill.run(), tune_gc=True)


def cmd_instances(args: argparse.Namespace) -> int:
    """The instances on this Redis and the shared budget's use, as JSON."""
    from redis.exceptions import RedisError

    from gitlab_producer.instances import cluster_status
    from gitlab_producer.startup import start_checks
    from gitlab_producer.store.redis_store import connect

    settings = _settings(args)
    if not settings.redis_address:
        config_exit(ConfigError("REDIS_ADDRESS: empty (the embedded store has one instance: "
                                "this command reads the instances of a Redis)"))
    host, port, password = settings.redis_endpoint

    async def main() -> int:
        (await start_checks(settings)).close()
        client = connect(f"{host}:{port}", password, settings.redis_db, 2)
        try:
            found = await cluster_status(client, settings.redis_key_prefix,
                                         settings.operations_per_second)
        except (RedisError, OSError) as exc:
            print(f"redis unreachable: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.aclose()
        sys.stdout.buffer.write(orjson.dumps(found, option=orjson.OPT_INDENT_2) + b"\n")
        return 0

    return run_command(main())


def cmd_demo(args: argparse.Namespace) -> int:
    from gitlab_producer.demo import run_demo

    return run_demo(rounds=args.rounds, out_dir=Path(args.out))


def cmd_simulate(args: argparse.Namespace) -> int:
    from gitlab_producer.simulator.main import simulate

    return simulate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gitlab-producer", description="Stream GitLab events into Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="sync rounds forever (or one with --once)")
    run.add_argument("--once", action="store_true", help="one complete round, then exit")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.set_defaults(func=cmd_check_config)
    instances = sub.add_parser("instances", help="instances alive on this Redis, their work "
                               "and the shared request budget's use")
    instances.set_defaults(func=cmd_instances)
    backfill = sub.add_parser("backfill", help="import every project's full object history, "
                              "then exit (resumable)")
    worker = sub.add_parser("worker", help="serve the import's jobs from Redis (any number)")
    status = sub.add_parser("status", help="per project: stage, counts, failures")
    for p in (backfill, worker, status):
        p.set_defaults(func=cmd_backfill)
    for p in (run, check, instances, backfill, worker, status):
        p.add_argument("--config", default=None,
                       help=f"YAML config file (default: {DEFAULT_CONFIG_PATH}, if present)")

    capture = sub.add_parser("capture", help="store a project's configured files at a commit")
    capture.add_argument("--project", required=True, help="project id or full path")
    capture.add_argument("--ref", required=True, help="commit SHA (40 or 64 hex)")
    capture.add_argument("--as-user", default=None, help="capture on behalf of this user")
    capture.add_argument("--config", default=None,
                         help=f"YAML config file (default: {DEFAULT_CONFIG_PATH}, if present)")
    capture.set_defaults(func=cmd_capture)

    demo = sub.add_parser("demo", help="the simulator plus the service on embedded defaults")
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--out", default="var/demo", help="folder for the demo's files")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("simulate", help="serve a simulated GitLab API")
    sim.add_argument("--projects", type=int, default=200)
    sim.add_argument("--users", type=int, default=50)
    sim.add_argument("--events", type=int, default=5000)
    sim.add_argument("--history-days", type=float, default=3.0)
    sim.add_argument("--port", type=int, default=8080)
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--token", default="sim-token")
    sim.add_argument("--rate-limit", type=float, default=0.0, help="requests per second")
    sim.add_argument("--route-limit", action="append", default=[],
                     help="per-route budget such as projects_list=2000/600")
    sim.add_argument("--faults", type=float, default=0.0, help="share of faulty answers")
    sim.add_argument("--live-rate", type=float, default=0.0, help="new events per second")
    sim.add_argument("--activity-interval", type=float, default=3600.0)
    sim.add_argument("--hidden-share", type=float, default=0.03)
    sim.add_argument("--quiet-minutes", type=float, default=0.0,
                     help="the generated history ends this long before start-up")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--objects-per-project", type=int, default=60,
                     help="mean issues + merge requests + notes + pipelines per project")
    sim.add_argument("--big-project-issues", type=int, default=0,
                     help="project 1 gets this many issues")
    sim.add_argument("--feature-off-share", type=float, default=0.1,
                     help="share of projects with each feature (issues, CI, ...) switched off")
    sim.add_argument("--change-rate", type=float, default=0.0,
                     help="object changes per second (live mode)")
    sim.add_argument("--gitlab-com-limits", action="store_true",
                     help="gitlab.com's per-endpoint limits on the projects, groups, users APIs")
    sim.add_argument("--utc-offset", default="Z",
                     help="the server's time zone, e.g. -08:00 (UTC-12..UTC+14; default UTC)")
    sim.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
