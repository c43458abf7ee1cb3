"""Typed per-request cache: one state per layer, owned by the caller and passed into the model.

An attention layer keeps a ``KVState`` (grows with the number of tokens T); a DSLA layer keeps a
``DSLAState`` (two float32 matrices per KV head, plus the last W tokens' k and v when the layer
has an exact window: fixed size). A ``RequestCache`` holds one of them per layer, so a single
request can run some layers as attention and others as DSLA.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from dsla.model.capacity import grown_capacity


class KVState:
    """Keys (after RoPE) and values of one attention layer for one request.

    K and V share one preallocated buffer of ``capacity`` tokens, (2, H, capacity, D) with H = KV
    heads: a decode step writes a token's key and value with one copy. The server sizes it at
    admission for the prompt plus the decode reserve; past that it grows by ``grown_capacity``
    (one copy, rare). ``k``/``v`` views: (H, T, D).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", capacity: int = 64) -> None:
        # zeros, not empty: a KVBatch's SDPA call reads rows past a request's length (masked, but
        # a NaN left in uninitialised memory would still reach the output through the mask)
        self._set_buffer(torch.zeros(2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device))
        self.length = 0

    def _set_buffer(self, kv: Tensor, batch: tuple[KVBatch, int] | None = None) -> None:
        self._kv = kv  # (2, H, capacity, D): K then V
        self._capacity = kv.shape[2]  # read per request and layer in every decode step: kept, not looked up
        self.batch = batch  # (KVBatch, row) when the buffer is that batch's row (see KVBatch)
        self._k, self._v = kv.unbind(0)  # (H, capacity, D) views
        # (1, H, capacity, D) views: a request's keys and values as a batch of one, built once
        # so a decode step only narrows them (per-request work is the decode path's overhead)
        self._k1, self._v1 = kv[0:1], kv[1:2]
        # for dsla.ops.cpu_kernels' decode attention: v's offset from k in bytes, the head stride in
        # elements (offsets, not addresses: a copy of this state, deepcopy included, has its own buffer)
        self._v_offset, self._head_stride = kv.stride(0) * kv.element_size(), kv.stride(1)
        if kv.stride(3) != 1 or kv.stride(2) != kv.shape[3]:  # the kernel's layout: tokens of D contiguous values
            raise ValueError(f"KV buffer strides {kv.stride()} of shape {tuple(kv.shape)}: want (..., capacity, D) contiguous")
        self._shape_meta = (kv.shape[1], kv.shape[3], kv.element_size())

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def dtype(self) -> torch.dtype:
        return self._kv.dtype

    @property
    def k(self) -> Tensor:
        return self._k[:, : self.length]  # (H, T, D)

    @property
    def v(self) -> Tensor:
        return self._v[:, : self.length]  # (H, T, D)

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` tokens (growing by ``grown_capacity``: one copy of the prefix)."""
        cap = grown_capacity(self.capacity, needed)
        if cap != self.capacity:
            kv = self._kv.new_zeros(2, self._kv.shape[1], cap, self._kv.shape[3])  # zeros: see __init__
            kv[:, :, : self.length] = self._kv[:, :, : self.length]
            self.leave_batch()  # its old row must not stay alive behind the other members
            self._set_buffer(kv)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (H, L, D) keys and values; return all keys and values so far, (H, T, D) each."""
        new_len = self.length + k.shape[1]
        self.reserve(new_len)
        self._k[:, self.length: new_len] = k
        self._v[:, self.length: new_len] = v
        self.length = new_len
        return self.k, self.v

    def batch_views(self) -> tuple[Tensor, Tensor]:
        """Keys and values so far as a batch of one, (1, H, T, D) each (views, no copy)."""
        return self._k1.narrow(2, 0, self.length), self._v1.narrow(2, 0, self.length)

    def kernel_meta(self) -> tuple[int, ...]:
        """(k address, v address, head stride in elements, length, capacity, KV heads, head dim,
        bytes per element): this cache for ``dsla.ops.cpu_kernels.decode_attention_cpu``."""
        k = self._kv.data_ptr()
        return (k, k + self._v_offset, self._head_stride, self.length, self._capacity, *self._shape_meta)

    @property
    def nbytes(self) -> int:
        """Bytes held (allocated capacity, which is what the memory budget must count)."""
        return self._kv.numel() * self._kv.element_size()

    def leave_batch(self) -> None:
        """Before this state is dropped: the other members of its ``KVBatch`` get their own
        buffers, so its row (and the batch's tensor) is really freed with it."""
        if self.batch is not None:
            batch, self.batch = self.batch[0], None
            batch.dissolve()

    def clone(self) -> KVState:
        """An independent copy of the same capacity."""
        c = KVState(self._kv.shape[1], self._kv.shape[3], self._kv.dtype, self._kv.device, self.capacity)
        c.append(self.k, self.v)
        return c


class KVBatch:
    """The KV buffers of R requests of equal capacity stacked into one (2, R, H, capacity, D)
    tensor, each request's buffer a view of its row: a decode step attends over all R with one
    SDPA call (lengths masked) instead of one call per request, with no copy while the same
    requests decode together. Built by one copy when they change; a request whose cache grows
    (``KVState.reserve``) gets its own buffer again and leaves the batch. Memory is unchanged:
    each row is exactly the buffer it replaces (hence equal capacities only), and when a new
    batch replaces one, the old one's other members get their own buffers, so no stale rows stay
    alive behind a single member's view. While a batch is rebuilt, one layer's old and new buffers
    of its members coexist (at most twice that layer's KV of the group, freed before the next
    layer): a transient the scheduler's byte budget does not count."""

    __slots__ = ("kv", "members")

    def __init__(self, states: Sequence[KVState]) -> None:
        olds = {id(s.batch[0]): s.batch[0] for s in states if s.batch is not None}
        self.kv = torch.stack([s._kv for s in states], dim=1)  # (2, R, H, capacity, D)
        self.members = [weakref.ref(s) for s in states]
        for r, s in enumerate(states):
            s._set_buffer(self.kv[:, r], (self, r))
        for old in olds.values():  # members left behind: their own copy, and the old tensor is freed
            old.dissolve()

    def dissolve(self) -> None:
        """Every member still in this batch gets its own buffer (a copy of its row), so the
        batch's tensor is freed once the caller drops the member it is removing."""
        for ref in self.members:
            m = ref()
            if m is not None and m.batch is not None and m.batch[0] is self:
                m._set_buffer(m._kv.clone())

    @staticmethod
    def current(states: Sequence[KVState]) -> KVBatch | None:
        """The batch whose rows these states are, exactly and in this order, or None."""
        first = states[0].batch
        if first is not None and len(first[0].members) == len(states) and \
                all(s.batch is not None and s.batch[0] is first[0] and s.batch[1] == r for r, s in enumerate(states)):
            return first[0]
        return None

    @staticmethod
    def of(states: Sequence[KVState]) -> KVBatch:
        """The batch whose rows these states are, in this order; a new one (one copy) if there
        is none. The states must share one capacity."""
        return KVBatch.current(states) or KVBatch(states)


def room_for_one_more(states: Sequence[KVState]) -> None:
    """Grow (``KVState.reserve``) each full state so it can take one more token."""
    for s in states:
        if s.length == s._capacity:
            s.reserve(s.length + 1)


def append_one_token(states: Sequence[KVState], kv: Tensor) -> None:
    """Append one token to each of R states: ``kv`` (2, H, R, D) holds request r's key and value
    at [:, :, r]. All R copies go in one ``_foreach_copy_`` call (a Python loop of R slice
    assignments is a decode step's per-request overhead, paid in every attention layer)."""
    room_for_one_more(states)
    batch = KVBatch.current(states)
    if batch is not None:  # rows of one tensor: one indexed write (R slice views cost more than the copy)
        R = len(states)
        rows = torch.arange(R, device=kv.device)
        pos = torch.tensor([s.length for s in states], device=kv.device)
        batch.kv.permute(1, 3, 0, 2, 4).index_put_((rows, pos), kv.permute(2, 0, 1, 3))  # (R, cap, 2, H, D)[r, len]
    else:
        torch._foreach_copy_([s._kv.select(2, s.length) for s in states], kv.unbind(2))
    for s in states:
        s.length += 1


@dataclass
class DSLAState:
    """History and recency states of one DSLA layer for one request, plus its exact window.

    ``state``: (H, S, K, V) float32 with H = KV heads, S = number of states (history first),
    K = feature width, V = value width (+1 for the normaliser column). With a window of W tokens
    (``DSLAConfig.window``), ``window_k`` / ``window_v`` (H, W, D) in the model dtype hold the keys
    (after RoPE) and values of the last min(W, length) tokens as a ring buffer: token i at row
    i mod W, rows not yet written zero (so a decode step writes one row, in place, over the token
    that leaves). Allocated at W rows up front, so the size never depends on T. ``ordered_window``
    gives them oldest first, right-aligned (the ``dsla.ops.window.WindowState`` layout). With
    attention sinks (``DSLAConfig.sinks`` = S), ``sink_k`` / ``sink_v`` (H, S, D) hold the first S
    tokens (row j is token j; zero until seen), also allocated up front.
    """

    state: Tensor
    length: int = 0  # tokens this layer has seen (those older than the window are in ``state``)
    window_k: Tensor | None = None  # (H, W, D) keys after RoPE of the window; None without a window
    window_v: Tensor | None = None  # (H, W, D) their values
    # after a decode step: (dsla.model.dsla.DecodeBatch, row) whose rows state / window_k /
    # window_v are, so the next step need not stack them again (checked by identity there)
    batch: object = field(default=None, repr=False, compare=False)
    # keys and values of the layer's exact KV groups (``DSLAAttention.exact_groups``), every token:
    # a KV cache of those heads only, growing with the length as an attention layer's does
    exact: KVState | None = None
    sink_k: Tensor | None = None  # (H, S, D) keys after RoPE of the first S tokens; None without sinks
    sink_v: Tensor | None = None  # (H, S, D) their values

    def __post_init__(self) -> None:
        if self.state.dtype != torch.float32:
            raise TypeError(f"DSLA state must be float32, got {self.state.dtype}")
        if (self.window_k is None) != (self.window_v is None):
            raise ValueError("window_k and window_v go together: give both or neither")
        wk, wv = self.window_k, self.window_v
        if wk is not None and (wk.dim() != 3 or wv.dim() != 3 or wk.shape[:2] != wv.shape[:2]):
            raise ValueError(f"window_k and window_v must be (H, W, D) alike, got {tuple(self.window_k.shape)} "
                             f"and {tuple(self.window_v.shape)}")
        if (self.sink_k is None) != (self.sink_v is None) or (self.sink_k is not None and wk is None):
            raise ValueError("sink_k and sink_v go together, and only with a window")

    @property
    def window(self) -> int:
        """W, the window's capacity in tokens (0: none)."""
        return 0 if self.window_k is None else self.window_k.shape[1]

    @property
    def window_count(self) -> int:
        """Rows of the window that hold tokens."""
        return min(self.window, self.length)

    def ordered_window(self) -> tuple[Tensor, Tensor]:
        """The window's keys and values oldest first, right-aligned (copies), (H, W, D) each."""
        from dsla.ops.window import ordered_from_ring
        return ordered_from_ring(self.window_k, self.length), ordered_from_ring(self.window_v, self.length)

    def set_ordered_window(self, k: Tensor, v: Tensor, heads: Tensor | None = None) -> None:
        """Store right-aligned rows (oldest first) for the current ``length``, in the ring layout;
        with ``heads`` (indices), ``k`` and ``v`` are those heads' rows only."""
        from dsla.ops.window import ring_from_ordered
        for ring, rows in ((self.window_k, k), (self.window_v, v)):
            rows = ring_from_ordered(rows, self.length)
            ring.copy_(rows) if heads is None else ring.index_copy_(0, heads, rows)

    def clone(self) -> DSLAState:
        """An independent copy (for forking a request's cache)."""
        wk = None if self.window_k is None else self.window_k.clone()
        wv = None if self.window_v is None else self.window_v.clone()
        sk = None if self.sink_k is None else self.sink_k.clone()
        sv = None if self.sink_v is None else self.sink_v.clone()
        return DSLAState(self.state.clone(), self.length, wk, wv, exact=None if self.exact is None else self.exact.clone(),
                         sink_k=sk, sink_v=sv)

    @property
    def nbytes(self) -> int:
        """Bytes held: the states, the window's rows and the exact groups' KV buffer."""
        return self.fixed_nbytes + (0 if self.exact is None else self.exact.nbytes)

    @property
    def fixed_nbytes(self) -> int:
        """Bytes that do not depend on the length: the states, the window's and the sinks' rows."""
        return sum(t.numel() * t.element_size()
                   for t in (self.state, self.window_k, self.window_v, self.sink_k, self.sink_v) if t is not None)


LayerState = KVState | DSLAState


@dataclass
class RequestCache:
    """Everything the model remembers about one request: a state per layer."""

    layers: list[LayerState]
    num_tokens: int = 0  # tokens already processed (the position of the next token)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    def release(self) -> None:
        """Before the cache is dropped: leave every ``KVBatch`` (see ``KVState.leave_batch``) and
        hold no batch's tensor any more, so a reference to this cache that outlives it (a
        traceback, a step's list) pins nothing beyond its own rows' bytes."""
        for s in self.layers:
            kv = s if isinstance(s, KVState) else s.exact
            if kv is not None and kv.batch is not None:
                kv.leave_batch()
                kv._set_buffer(kv._kv.clone())

    def dsla_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if isinstance(s, DSLAState)]
