"""The baseline: a trivial nats-py responder, in its own process.

``python -m bench.echo URL SUBJECT [QUEUE]`` answers every request on SUBJECT with its
own body; a request that carries headers (the bench sends ``traceparent``) is answered
with those headers plus the two identity headers a node adds to every reply
(PROTOCOL.md §1), so the echo parses and builds the same headers a node does. It replies
with ``nc.publish`` like the node (``Msg.respond`` cannot set headers). Prints ``READY``
once subscribed; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import nats
from nats.aio.msg import Msg


async def main(url: str, subject: str, queue: str) -> None:
    nc = await nats.connect(url, name="bench-echo", pending_size=32 * 1024 * 1024)
    identity = {"Compute-Node-ID": "echo", "Compute-Instance-ID": str(uuid.uuid4())}

    async def echo(msg: Msg) -> None:
        if msg.headers:
            await nc.publish(msg.reply, msg.data, headers={**identity, **msg.headers})
        else:
            await nc.publish(msg.reply, msg.data)

    await nc.subscribe(subject, queue=queue, cb=echo)
    await nc.flush()
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await stop.wait()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
