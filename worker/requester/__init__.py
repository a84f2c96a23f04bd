"""A requester client of the compute node protocol (PROTOCOL.md §2–§6).

Used by the CLI and the tests. One :class:`Requester` per requester ID and connection:

```
start() ──► subscribe <p>.info.*                 (which nodes are up, for fan-out)
        └─► subscribe <p>.orchestrator.<r>.>     (callbacks: core sub, or an ordered
                                                  JetStream consumer on CALLBACKS_<p>)
place(job) ──► fan_out ──► choose ──► accept ──► reject the others (late bids too)
run_to_completion ──► wait RunResult ──► ResultAccepted ──► wait Publish/Failure/Cancel
```

Every request has an explicit timeout and carries W3C trace context, so a span the
caller opens around ``place`` and ``run_to_completion`` covers the whole job (§8).
Callbacks are checked (node token = ``SourcePeerID``), deduplicated by ``Nats-Msg-Id``
and queued per execution; in core mode they can be lost, so ``reconcile`` asks the node.

Modules, along that flow: ``requests`` (one request to one node), ``errors`` (error
replies), ``fanout`` (one ask to all, replies per node), ``placement`` (accept one, reject
the rest), ``callbacks`` (intake, dedup, queues) and ``client`` (``Requester``).
"""

from worker.connection import flush_subscriptions
from worker.requester.callbacks import DEDUP_MEMORY as DEDUP_MEMORY
from worker.requester.callbacks import MSG_ID_HEADER as MSG_ID_HEADER
from worker.requester.callbacks import TERMINAL_KINDS as TERMINAL_KINDS
from worker.requester.client import INFO_INTERVAL as INFO_INTERVAL
from worker.requester.client import SEEN_WINDOW as SEEN_WINDOW
from worker.requester.client import Requester
from worker.requester.errors import ERROR_CODE_HEADER as ERROR_CODE_HEADER
from worker.requester.errors import ERROR_HEADER as ERROR_HEADER
from worker.requester.errors import NODE_HEADER as NODE_HEADER
from worker.requester.errors import STATUS_HEADER as STATUS_HEADER
from worker.requester.errors import PlacementError, RequestFailed
from worker.requester.fanout import Bids
from worker.requester.placement import Chooser as Chooser
from worker.requester.placement import Placement, first_bid

__all__ = [
    "Bids",
    "Placement",
    "PlacementError",
    "RequestFailed",
    "Requester",
    "first_bid",
    "flush_subscriptions",
]
