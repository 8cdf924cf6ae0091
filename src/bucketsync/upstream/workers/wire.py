"""What the agent and its sync workers say to each other, over the worker's stdin and stdout.

A frame is a 4-byte big-endian length and a pickle. Both ends are this package's code,
started from the same interpreter, so pickle is safe here: nothing else writes to the pipes.

Agent -> worker: ``("job", id, Job)``, ``("credit", id, n)`` (n more steps may be sent),
``("cancel", id)``. Worker -> agent: ``("ready", pid)`` once, then per job
``("step", id, joined_keys, n_keys, packed_changes, unchanged, gaps)`` any number of times and
one of ``("end", id, sample, gaps)`` or ``("error", id, WireError, gaps)``.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from bucketsync.core import errors
from bucketsync.core.model import Change, ChangeKind, Indexed, ItemState, ObjectInfo
from bucketsync.stores import StoreSpec
from bucketsync.stores.parallel import Quantiles

_LEN = struct.Struct(">I")
#: a frame larger than this is a broken pipe, not a message (a step of 1,024 changes is far below)
MAX_FRAME = 1 << 30
#: keys are sent joined by this: no indexable key holds a NUL (``core.keys.indexable``)
SEP = "\x00"


@dataclass(frozen=True, slots=True)
class Job:
    """One run's listing and diff, as a worker does it."""

    #: the dataset's name (the worker keeps one open store per dataset, for its connections)
    dataset: str
    #: changes whenever the agent builds a new store for the dataset (a reload): a new store there too
    generation: int
    store: StoreSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    #: the ledger: a SQLite file or a PostgreSQL URL, opened read-only for the snapshot
    ledger: str
    ledger_password: str | None
    dataset_id: int
    splits: tuple[str, ...]
    #: the run's split-point sampler, fresh: the worker feeds it the listed keys and sends back its keys
    sample: Quantiles
    #: keys per step at most
    step: int


def frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at the end of the stream (the other side is gone)."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("the pipe ended inside a frame") from None
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ConnectionError(f"a frame of {size} bytes: the pipe is out of step")
    try:
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        raise ConnectionError("the pipe ended inside a frame") from None
    return message


@dataclass(frozen=True, slots=True)
class WireError:
    """An exception raised in a worker, rebuilt in the agent as the same class of
    ``core.errors`` with the same message and attributes. Any other exception (a bug, an
    SDK's) comes back as ``ListingFailed`` with the text the run would have recorded."""

    name: str | None
    args: tuple[Any, ...]
    attrs: dict[str, Any]
    text: str

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        kind = type(exc)
        ours = kind.__module__ == errors.__name__ and getattr(errors, kind.__name__, None) is kind
        text = str(exc) or kind.__name__
        if not ours:
            return cls(None, (), {}, f"{kind.__name__}: {text}")
        try:
            attrs = dict(vars(exc))
            pickle.dumps((exc.args, attrs))
        except Exception:  # something in it does not cross a pipe: the message does
            return cls(None, (), {}, text)
        return cls(kind.__name__, exc.args, attrs, text)

    def rebuild(self) -> Exception:
        if self.name is not None:
            kind = getattr(errors, self.name)
            exc: Exception = kind.__new__(kind)
            exc.args = self.args
            vars(exc).update(self.attrs)
            return exc
        return errors.ListingFailed(self.text)


#: a ``Change`` as it crosses the pipe: (kind, key, new as a tuple or None, old as a tuple or None)
Packed = tuple[str, str, tuple[Any, ...] | None, tuple[Any, ...] | None]
_KINDS = {str(k): k for k in ChangeKind}
_STATES = {str(s): s for s in ItemState}


def pack(changes: list[Change]) -> list[Packed]:
    """Changes as plain tuples. Unpickled, a slots dataclass goes through ``dataclasses``'
    ``__setstate__`` (about 20 µs each, measured under load); a tuple and the constructor
    cost a third of that, in the agent, for every added or modified key of a run."""
    out: list[Packed] = []
    for ch in changes:
        n, o = ch.new, ch.old
        out.append(
            (
                ch.kind.value,
                ch.key,
                None if n is None else (n.key, n.size, n.modified, n.etag, n.version),
                None if o is None else (o.id, o.key, o.size, o.modified, o.etag, o.version, o.state.value),
            )
        )
    return out


def unpack(packed: list[Packed]) -> list[Change]:
    kinds, states = _KINDS, _STATES
    return [
        Change(
            kinds[kind],
            key,
            None if n is None else ObjectInfo(n[0], n[1], n[2], n[3], n[4]),
            None if o is None else Indexed(o[0], o[1], o[2], o[3], o[4], o[5], states[o[6]]),
        )
        for kind, key, n, o in packed
    ]


class JoinedKeys(Sequence[str]):
    """A step's keys as they cross the pipe: one NUL-joined string (one object to pickle, not
    hundreds), split only when the agent needs them (while downstream owns keys)."""

    __slots__ = ("_joined", "_keys", "_n")

    def __init__(self, joined: str, n: int) -> None:
        self._joined, self._n = joined, n
        self._keys: list[str] | None = None

    def _split(self) -> list[str]:
        if self._keys is None:
            self._keys = self._joined.split(SEP) if self._n else []
        return self._keys

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return self._split()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._split())
