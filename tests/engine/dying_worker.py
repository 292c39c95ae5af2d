"""A SAQ worker process for the sweep tests: ``python dying_worker.py URL QUEUE``. Its job
announces itself in Redis and then runs until the test kills the process with SIGKILL."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from saq import Queue, Worker


async def beating(ctx: dict[str, Any]) -> None:
    await ctx["worker"].queue.redis.rpush(f"{ctx['worker'].queue.name}:runs", "first")
    await asyncio.sleep(3600)


async def main(url: str, name: str) -> None:
    queue = Queue.from_url(url, name=name)
    worker = Worker(queue, [("beating", beating)], concurrency=1,
                    timers={"schedule": 1, "sweep": 1, "abort": 1, "worker_info": 1})
    await worker.start()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
