"""The engine's client store: every client's state by client id, in memory up to a byte budget.

A `ClientStore` is a mapping `cid -> State` (a dict of tensors, core/types.py) that the engine reads
when it hands a client a job and writes when the client's new state comes back. Two things make it
more than a dict, both for federations of thousands of clients:

* **A budget** (`--state-budget-gb`): past it, the least recently used states are written to disk
  (`torch.save` into a temporary directory of the run, removed when the store is closed or dropped)
  and read back (`torch.load`) when a job needs them, bit for bit: a run's numbers are the same with
  any budget, only its speed changes. The size of a state is the sum of its tensors' `nbytes`.
  None (the default) means no budget: nothing is ever written to disk, as with a dict.
* **A default** (`default(cid)`): a client not in the store reads as `default(cid)`, which is made
  afresh on every read and not kept (unlike `collections.defaultdict`). The engine passes
  `init_client` from the initial server, so a client costs memory only once it has trained: 10,000
  clients of which 100 train hold 100 states, not 10,000.

Recency: a write makes a state the most recent; a read of a state in memory refreshes it too. A read
of a spilled state loads a copy and leaves the disk copy where it is (an evaluation reads states
without changing them, so promoting them would only write others out); the next write replaces it.

Written here rather than taken from a library: the states must come back bit-identical and in
`torch`'s own format, and the policy is a few lines over `OrderedDict` (diskcache, shelve and
joblib.Memory pickle, and key by strings or hashes, with their own eviction rules and statistics).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping

import torch

from fedeq_bench.core.types import State

GB = 10**9
"""`--state-budget-gb` counts decimal gigabytes (10^9 bytes), as `nbytes` and disk sizes are reported."""


def state_bytes(state: State) -> int:
    """Bytes a state holds in memory: the sum of its tensors' `nbytes` (what spilling it frees)."""
    return sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor))


def budget_bytes(gb: float | None) -> int | None:
    """`--state-budget-gb` in bytes; None stays None (no budget)."""
    return None if gb is None else int(gb * GB)


class ClientStore(MutableMapping):
    """`cid -> State`, in memory up to `budget` bytes, the least recently used spilled to disk.

    `budget`: bytes of states kept in memory (None: no limit; 0: every non-empty state on disk).
    `default`: what a client not in the store reads as (made on every read, never kept); None: KeyError.
    `spill_dir`: where the run's temporary directory is made (None: the system's, $TMPDIR).
    Iteration is in client-id order over the stored clients (in memory or on disk), never the defaults.
    """

    def __init__(self, budget: int | None = None, default: Callable[[int], State] | None = None,
                 spill_dir: str | None = None):
        if budget is not None and budget < 0:
            raise ValueError(f"a state budget is a number of bytes >= 0, got {budget}")
        self.budget = budget
        self.default = default
        self._parent = spill_dir
        self._dir: str | None = None  # made at the first spill: a run within budget touches no disk
        self._cleanup: weakref.finalize | None = None
        self._mem: OrderedDict[int, State] = OrderedDict()  # least recently used first
        self._size: dict[int, int] = {}
        self._disk: dict[int, str] = {}
        self.mem_bytes = 0
        """Bytes of the states held in memory (at most `budget` after every write)."""
        self.disk_bytes = 0
        """Bytes (state_bytes) of the states on disk."""
        self.spills = 0
        """States written to disk so far."""
        self.loads = 0
        """States read back from disk so far."""

    # -- the mapping --------------------------------------------------------------------------------
    def __getitem__(self, cid: int) -> State:
        state = self._mem.get(cid)
        if state is not None:
            self._mem.move_to_end(cid)
            return state
        path = self._disk.get(cid)
        if path is not None:
            self.loads += 1
            # Our own files in a private directory: plain tensors, so the safe loader suffices.
            return torch.load(path, weights_only=True)
        if self.default is not None:
            return self.default(cid)
        raise KeyError(cid)

    def __setitem__(self, cid: int, state: State) -> None:
        self._forget(cid)
        n = state_bytes(state)
        self._mem[cid] = state
        self._size[cid] = n
        self.mem_bytes += n
        if self.budget is not None:
            # Oldest first; the state just written goes too when it alone exceeds the budget.
            while self.mem_bytes > self.budget and self._mem:
                self._spill(next(iter(self._mem)))

    def __delitem__(self, cid: int) -> None:
        if cid not in self:
            raise KeyError(cid)
        self._forget(cid)

    def __contains__(self, cid) -> bool:
        return cid in self._mem or cid in self._disk

    def __iter__(self) -> Iterator[int]:
        # A sorted snapshot: client-id order (as the engine reduces), and safe to write while iterating.
        return iter(sorted([*self._mem, *self._disk]))

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    # -- spilling -----------------------------------------------------------------------------------
    def _spill(self, cid: int) -> None:
        state = self._mem.pop(cid)
        n = self._size.pop(cid)
        path = os.path.join(self._spill_dir(), f"{cid}.pt")
        torch.save(state, path)
        self._disk[cid] = path
        self._size[cid] = n
        self.mem_bytes -= n
        self.disk_bytes += n
        self.spills += 1

    def _forget(self, cid: int) -> None:
        """Drop cid's state wherever it is (memory or disk)."""
        if cid in self._mem:
            del self._mem[cid]
            self.mem_bytes -= self._size.pop(cid)
        elif cid in self._disk:
            os.remove(self._disk.pop(cid))
            self.disk_bytes -= self._size.pop(cid)

    def _spill_dir(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="fedeq-client-states-", dir=self._parent)  # mode 0700
            # Removed when the store is closed, garbage-collected, or at interpreter exit, whichever
            # comes first: a failed run leaves no spilled states behind.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def close(self) -> None:
        """Forget every state and remove the spill directory (the store stays usable, empty)."""
        self._mem.clear()
        self._size.clear()
        self._disk.clear()
        self.mem_bytes = self.disk_bytes = 0
        if self._cleanup is not None:
            self._cleanup()
        self._dir = self._cleanup = None

    @property
    def spill_dir(self) -> str | None:
        """The run's temporary directory, once something has been spilled."""
        return self._dir

    def stats(self) -> dict[str, int]:
        """Counts and bytes: `in_memory`, `on_disk`, `mem_bytes`, `disk_bytes`, `spills`, `loads`."""
        return {"in_memory": len(self._mem), "on_disk": len(self._disk), "mem_bytes": self.mem_bytes,
                "disk_bytes": self.disk_bytes, "spills": self.spills, "loads": self.loads}
