"""``gitlab-producer simulate``: serve a simulated GitLab until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
import time

from gitlab_producer.simulator.control import GITLAB_COM_BUDGETS, Control, RouteBudget
from gitlab_producer.simulator.server import Simulator, serve
from gitlab_producer.simulator.world import World, WorldSpec, parse_utc_offset


def simulate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        utc_offset_s = parse_utc_offset(args.utc_offset)
    except ValueError as exc:
        print(f"--utc-offset: {exc}", file=sys.stderr)
        return 2
    world = World(WorldSpec(
        projects=args.projects, users=args.users, events=args.events, seed=args.seed,
        history_days=args.history_days, activity_interval_s=args.activity_interval,
        hidden_share=args.hidden_share, quiet_s=args.quiet_minutes * 60,
        objects_per_project=args.objects_per_project, big_project_issues=args.big_project_issues,
        feature_off_share=args.feature_off_share, utc_offset_s=utc_offset_s))
    budgets = dict(GITLAB_COM_BUDGETS) if args.gitlab_com_limits else {}
    budgets.update(RouteBudget.parse(text) for text in args.route_limit)
    control = Control(rate_limit=args.rate_limit, route_budgets=budgets,
                      fault_rate=args.faults, seed=args.seed)
    sim = Simulator(world, control, args.token, args.live_rate, change_rate=args.change_rate)

    # The world lives as long as the process: kept out of the collector's reach, a full
    # collection no longer walks it and stalls requests (their arrival times) meanwhile.
    gc.freeze()

    async def main() -> None:
        runner = await serve(sim, args.host, args.port)
        print(f"simulated GitLab ready at http://{args.host}:{args.port}/api/v4 "
              f"({len(world.ev_time)} events, {world.project_count} projects, "
              f"{world.user_count} users, UTC offset {utc_offset_s} s, "
              f"built in {time.perf_counter() - started:.1f} s)",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    from gitlab_producer.cli import run_async

    async def until_stopped() -> int:
        await main()
        return 0

    return run_async(until_stopped())
