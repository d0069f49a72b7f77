"""The bulkhead: a fleet-wide limit on concurrent calls to one resource.

policy   `Bulkhead`, `BulkheadConfig`, `Lease` (renewed in the background), snapshots
store    the store protocol, the Redis store (lua/bulkhead_*.lua) and the memory store
"""

from policies.bulkhead.policy import (
    Bulkhead,
    BulkheadConfig,
    BulkheadSnapshot,
    Lease,
    PendingRelease,
    list_bulkheads,
    queue_snapshot,
)

__all__ = [
    "Bulkhead",
    "BulkheadConfig",
    "BulkheadSnapshot",
    "Lease",
    "PendingRelease",
    "list_bulkheads",
    "queue_snapshot",
]
