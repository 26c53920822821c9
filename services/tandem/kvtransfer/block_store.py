"""A worker's paged KV cache seen as whole blocks: pack some into one flat buffer, unpack back.

Packed layout (the wire contract of every transport, DESIGN.md section 4):

    [num_layers, 2, n, block_size, num_kv_heads, head_dim]   flattened, in the KV cache dtype
    (the model's, or FP8: the stored bytes as they are; the scales are proven equal by the
    layout fingerprint, see tandem.common.layout)

K at index 0 and V at index 1, blocks in the order of the block ids given.

Who calls what: transports call `pack` on the source (prefill) worker, from a worker thread,
for blocks pinned by a lease, and `unpack` on the receiver (decode) worker, from a worker
thread, into blocks reserved for the pull. The step loop keeps owning the cache tensors: it
never writes a leased block (finished prompts are immutable) nor reads a reserved one before
`commit`, so these copies need no lock. The caller owns the buffer `pack` returns.

On CUDA the copies are the Triton kernels `kernels.pack_blocks/unpack_blocks`. On CPU they
compute exactly `tandem.kernels.reference`'s `ref_pack_blocks/ref_unpack_blocks` (tests compare them)
but write into a caller's reusable buffer, and copy runs of consecutive block ids (what block
pools mostly hand out) as slices, else use one `index_select`/`index_copy_` per layer. The
reference builds three temporaries per call; a fresh 64 MiB buffer page-faults at ~1.3 GB/s
on the development machines (slower than loopback TCP), and `index_copy_` runs at half the
speed of a slice copy there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.common.layout import KVLayout


def torch_dtype(name: str) -> torch.dtype:
    """A layout's dtype name ("bfloat16") as a torch dtype; ValueError if it is not one."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"KV dtype {name!r} is not a torch floating-point dtype")
    return dtype


class KVBlockStore:
    def __init__(self, kv_caches: list[torch.Tensor], layout: KVLayout) -> None:
        """`kv_caches`: per layer `[2, num_blocks, block_size, num_kv_heads, head_dim]`, the
        engine's own tensors (not copied). ValueError if they do not match `layout`."""
        self.layout = layout
        self.dtype = torch_dtype(layout.kv_dtype)
        if len(kv_caches) != layout.num_layers:
            raise ValueError(f"got {len(kv_caches)} KV cache tensors for {layout.num_layers} layers")
        first = kv_caches[0]
        self.num_blocks = first.shape[1] if first.dim() == 5 else 0
        expected = (2, self.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        for layer, cache in enumerate(kv_caches):
            if tuple(cache.shape) != expected or cache.dtype != self.dtype:
                raise ValueError(
                    f"KV cache of layer {layer} is {cache.dtype} {tuple(cache.shape)}; the layout "
                    f"needs {self.dtype} {expected}"
                )
            if cache.device != first.device or not cache.is_contiguous():
                raise ValueError(f"KV cache of layer {layer} must be contiguous on {first.device}")
        self.kv_caches = kv_caches
        self.device = first.device
        self.block_numel = layout.block_size * layout.num_kv_heads * layout.head_dim
        self.element_size = torch.empty((), dtype=self.dtype).element_size()
        # plane 2 * layer + kv as flat bytes: [num_blocks * block_numel * element_size], no copy
        self._flat_planes = [cache[kv].view(-1).view(torch.uint8) for cache in kv_caches for kv in (0, 1)]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V: the packed size of one block."""
        return 2 * self.layout.num_layers * self.block_numel * self.element_size

    def packed_shape(self, num_blocks: int) -> tuple[int, ...]:
        lay = self.layout
        return (lay.num_layers, 2, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)

    def check_block_ids(self, block_ids: Sequence[int]) -> tuple[int, ...]:
        """Return the ids as a tuple; ValueError unless each is in range and appears once."""
        ids = tuple(map(int, block_ids))  # once per pull and side, and per plane view: kept cheap
        if ids and not (min(ids) >= 0 and max(ids) < self.num_blocks):
            bad = next(b for b in ids if not 0 <= b < self.num_blocks)
            raise ValueError(f"block id {bad} is outside [0, {self.num_blocks})")
        if len(set(ids)) != len(ids):
            seen: set[int] = set()
            for b in ids:
                if b in seen:
                    raise ValueError(f"block id {b} appears twice")
                seen.add(b)
        return ids

    def pack(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather `block_ids` of every layer into a 1-D buffer of `len(block_ids) *
        bytes_per_block` bytes, in the model dtype. With `out` (1-D, any dtype, exactly that
        many bytes, on any device) the bytes land there and `out` viewed as the model dtype is
        returned; else a new buffer on the cache device."""
        ids = self.check_block_ids(block_ids)
        size_bytes = len(ids) * self.bytes_per_block
        if out is not None:
            self._check_buffer(out, size_bytes)
        if self.device.type == "cuda":
            from tandem import kernels

            packed = kernels.pack_blocks([c[0] for c in self.kv_caches], [c[1] for c in self.kv_caches], ids)
            if out is None:
                return packed
            out.view(torch.uint8).copy_(packed.view(torch.uint8))
            return out.view(self.dtype)
        if out is None:
            out = torch.empty(size_bytes // self.element_size, dtype=self.dtype, device=self.device)
        elif out.device != self.device:
            raise ValueError(f"packed KV buffer is on {out.device}, the CPU cache needs {self.device}")
        packed = out.view(self.dtype).view(self.packed_shape(len(ids)))
        copier = _BlockCopier(ids, self.device)
        for layer, cache in enumerate(self.kv_caches):
            copier.gather(cache, 1, packed[layer])  # [2, n, block_size, heads, head_dim]
        return out.view(self.dtype)

    # ---- planes: the torch transport sends the packed layout one (layer, K/V) plane at a time
    @property
    def num_planes(self) -> int:
        """Planes of the packed layout: plane `2 * layer + kv` holds that layer's K (kv=0) or V."""
        return 2 * self.layout.num_layers

    def plane_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.block_numel * self.element_size

    def plane_view(self, block_ids: Sequence[int], plane: int) -> torch.Tensor | None:
        """Plane `plane` of `pack(block_ids)` as a uint8 view of the cache itself (no copy), if
        the ids are one ascending run; else None. Valid while the blocks stay pinned."""
        ids = self.check_block_ids(block_ids)
        first = run_start(ids)
        return None if first is None else self.run_view(first, len(ids), plane)

    def run_view(self, first_block: int, num_blocks: int, plane: int) -> torch.Tensor:
        """Plane `plane` of the blocks [first_block, first_block + num_blocks) as a uint8 view of
        the cache itself (no copy; a 1-D slice, cheap enough to take per message)."""
        if not 0 <= first_block <= first_block + num_blocks <= self.num_blocks:
            raise ValueError(f"blocks [{first_block}, {first_block + num_blocks}) outside [0, {self.num_blocks})")
        size = self.plane_bytes(1)
        return self._flat_planes[plane][first_block * size : (first_block + num_blocks) * size]

    def pack_planes(self, block_ids: Sequence[int], first_plane: int, end_plane: int, out: torch.Tensor) -> None:
        """Planes [first_plane, end_plane) of `pack(block_ids)` into `out` (1-D, exactly their
        bytes, on the cache device)."""
        ids = self.check_block_ids(block_ids)
        self._check_buffer(out, (end_plane - first_plane) * self.plane_bytes(len(ids)))
        lay = self.layout
        row_shape = (lay.block_size, lay.num_kv_heads, lay.head_dim)
        planes = out.view(self.dtype).view(end_plane - first_plane, len(ids), *row_shape)
        copier = _BlockCopier(ids, self.device)
        for i, plane in enumerate(range(first_plane, end_plane)):
            layer, kv = divmod(plane, 2)
            copier.gather(self.kv_caches[layer][kv], 0, planes[i])

    def unpack_planes(self, buffer: torch.Tensor, block_ids: Sequence[int], first_plane: int, end_plane: int) -> None:
        """The inverse of `pack_planes`: scatter planes [first_plane, end_plane) of a packed
        buffer (1-D, exactly their bytes, on the cache device) into `block_ids`, in place."""
        ids = self.check_block_ids(block_ids)
        self._check_buffer(buffer, (end_plane - first_plane) * self.plane_bytes(len(ids)))
        lay = self.layout
        row_shape = (lay.block_size, lay.num_kv_heads, lay.head_dim)
        planes = buffer.view(self.dtype).view(end_plane - first_plane, len(ids), *row_shape)
        copier = _BlockCopier(ids, self.device)
        for i, plane in enumerate(range(first_plane, end_plane)):
            layer, kv = divmod(plane, 2)
            copier.scatter(planes[i], self.kv_caches[layer][kv], 0)

    def unpack(self, buffer: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Scatter a packed buffer (1-D, any dtype, any device, exactly `len(block_ids) *
        bytes_per_block` bytes) into `block_ids` of every layer, in place."""
        ids = self.check_block_ids(block_ids)
        self._check_buffer(buffer, len(ids) * self.bytes_per_block)
        values = buffer.view(self.dtype)
        if values.device != self.device:
            values = values.to(self.device, non_blocking=False)
        if self.device.type == "cuda":
            from tandem import kernels

            kernels.unpack_blocks(values, [c[0] for c in self.kv_caches], [c[1] for c in self.kv_caches], ids)
            return
        packed = values.view(self.packed_shape(len(ids)))
        copier = _BlockCopier(ids, self.device)
        for layer, cache in enumerate(self.kv_caches):
            copier.scatter(packed[layer], cache, 1)

    def _check_buffer(self, buffer: torch.Tensor, size_bytes: int) -> None:
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(f"packed KV buffer must be 1-D and contiguous, got shape {tuple(buffer.shape)}")
        got = buffer.numel() * buffer.element_size()
        if got != size_bytes:
            raise ValueError(f"packed KV buffer has {got} bytes, expected {size_bytes}")
        if buffer.dtype != self.dtype and size_bytes % self.element_size:
            raise ValueError(f"packed KV buffer of {got} bytes is not a whole number of {self.dtype} elements")


class PackedReader:
    """Byte ranges of `store.pack(block_ids)`, read in ascending order, without packing the
    whole buffer before the first byte can leave: on CPU, straight from the cache when the ids
    are one ascending run, else packed plane by plane into `staging` as reads reach them. On
    CUDA the whole buffer is packed into (host) `staging` on the first read.

    The source holds the blocks' lease checked out while it reads. One thread at a time.
    """

    def __init__(self, store: KVBlockStore, block_ids: Sequence[int], staging: torch.Tensor | None) -> None:
        self.store = store
        self.block_ids = ids = store.check_block_ids(block_ids)
        self.plane_bytes = store.plane_bytes(len(ids))
        self.total_bytes = len(ids) * store.bytes_per_block
        first = run_start(ids) if store.device.type == "cpu" else None
        self._planes: list[memoryview] = []
        if first is not None:  # the ids checked once, not once per plane (a pull's fixed cost)
            self._planes = [store.run_view(first, len(ids), p).numpy().data for p in range(store.num_planes)]
        elif staging is None:
            raise ValueError("these block ids need a staging buffer")
        self.staging = staging
        self._num_packed_planes = 0

    @staticmethod
    def needs_staging(store: KVBlockStore, block_ids: Sequence[int]) -> bool:
        """Whether a reader of these ids needs a staging buffer (the ids are checked by the reader)."""
        return store.device.type != "cpu" or run_start(tuple(block_ids)) is None

    def read(self, offset_bytes: int, size_bytes: int) -> list[memoryview]:
        """The bytes [offset, offset + size) of the packed buffer, as one or more views."""
        end = offset_bytes + size_bytes
        if not 0 <= offset_bytes < end <= self.total_bytes:
            raise ValueError(f"read of [{offset_bytes}, {end}) outside {self.total_bytes} bytes")
        if not self._planes:
            assert self.staging is not None
            self._pack_until(-(-end // self.plane_bytes))
            return [self.staging.numpy().data[offset_bytes:end]]
        pieces = []
        for plane in range(offset_bytes // self.plane_bytes, -(-end // self.plane_bytes)):
            base = plane * self.plane_bytes
            pieces.append(self._planes[plane][max(offset_bytes - base, 0) : min(end - base, self.plane_bytes)])
        return pieces

    def _pack_until(self, end_plane: int) -> None:
        assert self.staging is not None
        if self.store.device.type != "cpu":
            if self._num_packed_planes == 0:
                self.store.pack(self.block_ids, self.staging)
                self._num_packed_planes = self.store.num_planes
            return
        if end_plane > self._num_packed_planes:
            first = self._num_packed_planes
            part = self.staging[first * self.plane_bytes : end_plane * self.plane_bytes]
            self.store.pack_planes(self.block_ids, first, end_plane, part)
            self._num_packed_planes = end_plane


def run_start(ids: tuple[int, ...]) -> int | None:
    """The first id if `ids` are one ascending run of consecutive ids (none: 0), else None."""
    first = ids[0] if ids else 0
    return first if ids == tuple(range(first, first + len(ids))) else None


class _BlockCopier:
    """Copies between a cache's block axis and a packed block axis, for one list of block ids:
    slice copies when the ids form few ascending runs, else one index op."""

    MAX_RUNS_FRACTION = 8  # slices when runs <= len(ids) / 8: fewer, bigger copies

    def __init__(self, ids: tuple[int, ...], device: torch.device) -> None:
        self.runs: list[tuple[int, int, int]] = []  # (position in ids, first block id, length)
        for pos, block in enumerate(ids):
            if self.runs and self.runs[-1][1] + self.runs[-1][2] == block:
                start, first, length = self.runs[-1]
                self.runs[-1] = (start, first, length + 1)
            else:
                self.runs.append((pos, block, 1))
        self.use_slices = len(self.runs) * self.MAX_RUNS_FRACTION <= len(ids) or len(self.runs) == 1
        self.index = None if self.use_slices else torch.tensor(ids, dtype=torch.long, device=device)

    def gather(self, cache: torch.Tensor, dim: int, out: torch.Tensor) -> None:
        """out[..., i, ...] = cache[..., ids[i], ...] along `dim` (not the last one)."""
        cache, out = _as_words(cache), _as_words(out)
        if self.index is not None:
            torch.index_select(cache, dim, self.index, out=out)
            return
        for pos, first, length in self.runs:
            out.narrow(dim, pos, length).copy_(cache.narrow(dim, first, length))

    def scatter(self, values: torch.Tensor, cache: torch.Tensor, dim: int) -> None:
        """cache[..., ids[i], ...] = values[..., i, ...] along `dim` (not the last one)."""
        values, cache = _as_words(values), _as_words(cache)
        if self.index is not None:
            cache.index_copy_(dim, self.index, values)
            return
        for pos, first, length in self.runs:
            cache.narrow(dim, first, length).copy_(values.narrow(dim, pos, length))


def _as_words(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as 32-bit words where the last dim allows (a head_dim row of whole words),
    so that every copy moves bits, never values: on CPU, `index_copy_` has no float8 kernel at
    all, a float8 slice copy runs at less than half the speed of a word copy, and a bfloat16
    `index_copy_` at about half. A 1-byte dtype that cannot be viewed so is copied as bytes."""
    size = tensor.element_size()
    if size >= 4:
        return tensor
    if tensor.stride(-1) == 1 and (tensor.shape[-1] * size) % 4 == 0 and (tensor.storage_offset() * size) % 4 == 0:
        return tensor.view(torch.int32)
    return tensor.view(torch.uint8) if size == 1 else tensor
