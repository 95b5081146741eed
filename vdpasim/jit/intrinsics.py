"""LLVM-level building blocks Numba lacks: raw loads/stores, memcpy/memset, an atomic OR, memory fences,
the cycle counter, and calls into libc.

Guest memory is shared with another thread or process (the driver), so ring fields are read and
written through host addresses, as a kernel or DPDK back-end does. Every address passed here was
bounds-checked against the region table first (jit/memory.py); nothing here checks anything.

All loads return int64 (zero-extended) and stores take int64, so ring arithmetic never mixes
unsigned and signed Numba integers (which would silently become float64).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "load_u8",
    "load_u16",
    "load_u32",
    "load_u64",
    "store_u8",
    "store_u16",
    "store_u32",
    "store_u64",
    "memcpy",
    "memset",
    "atomic_or_u8",
    "load_relaxed_u64",
    "prefetch",
    "cpu_relax",
    "fence_acquire",
    "fence_release",
    "fence_full",
    "cycles",
    "call_libc",
]


def _make_load(bits: int):
    @intrinsic
    def load(typingctx, addr):
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            value = builder.load(ptr, align=1)
            return builder.zext(value, ir.IntType(64)) if bits < 64 else value

        return types.int64(types.int64), codegen

    return load


def _make_store(bits: int):
    @intrinsic
    def store(typingctx, addr, value):
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            raw = context.cast(builder, args[1], signature.args[1], types.int64)
            builder.store(builder.trunc(raw, ir.IntType(bits)) if bits < 64 else raw, ptr, align=1)
            return context.get_dummy_value()

        return types.void(types.int64, value), codegen

    return store


load_u8, load_u16, load_u32, load_u64 = (_make_load(bits) for bits in (8, 16, 32, 64))
store_u8, store_u16, store_u32, store_u64 = (_make_store(bits) for bits in (8, 16, 32, 64))


@intrinsic
def memcpy(typingctx, dst, src, length):
    """llvm.memcpy on host addresses: compiles to a real memcpy (10x faster than a byte loop at 1500 B)."""

    def codegen(context, builder, signature, args):
        byte_ptr = ir.IntType(8).as_pointer()
        d, s, n = (context.cast(builder, v, t, types.int64) for v, t in zip(args, signature.args, strict=True))
        cgutils.raw_memcpy(builder, builder.inttoptr(d, byte_ptr), builder.inttoptr(s, byte_ptr), n, 1)
        return context.get_dummy_value()

    return types.void(dst, src, length), codegen


@intrinsic
def memset(typingctx, dst, byte, length):
    def codegen(context, builder, signature, args):
        d, v, n = (context.cast(builder, x, t, types.int64) for x, t in zip(args, signature.args, strict=True))
        ptr = builder.inttoptr(d, ir.IntType(8).as_pointer())
        cgutils.memset(builder, ptr, n, builder.trunc(v, ir.IntType(8)))
        return context.get_dummy_value()

    return types.void(dst, byte, length), codegen


@intrinsic
def atomic_or_u8(typingctx, addr, value):
    """``*addr |= value`` on one byte as one atomic read-modify-write (a ``lock or`` on x86).

    For bitmaps another process clears concurrently (the dirty log QEMU reads and resets word by
    word): a plain load-or-store could lose a bit the other side cleared in between, or resurrect one.
    Sequentially consistent, so the data writes a bit stands for are visible before the bit.
    """

    def codegen(context, builder, signature, args):
        a, v = (context.cast(builder, x, t, types.int64) for x, t in zip(args, signature.args, strict=True))
        ptr = builder.inttoptr(a, ir.IntType(8).as_pointer())
        builder.atomic_rmw("or", ptr, builder.trunc(v, ir.IntType(8)), "seq_cst")
        return context.get_dummy_value()

    return types.void(addr, value), codegen


@intrinsic
def load_relaxed_u64(typingctx, addr):
    """An atomic (relaxed) 8-byte load: read afresh on every call, never hoisted out of a loop.

    For flags another thread sets while a compiled loop spins (the data path's interrupt word): a plain
    load in a loop that writes only through other pointers may legally be read once.
    """

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(ptr, "monotonic", 8)

    return types.int64(types.int64), codegen


@intrinsic
def prefetch(typingctx, addr, for_write):
    """Hint the cache to fetch the line at ``addr`` (``for_write``: a compile-time 0 or 1).

    The rings and buffers are written by a driver on another CPU, so each first touch is a cache miss;
    touching the next frames' lines a few frames ahead lets those misses overlap instead of queueing.
    """
    if not isinstance(for_write, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        i8_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8_ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64), i8_ptr)
        # rw, locality 3 (keep in all levels), data cache
        builder.call(fn, [ptr, i32(for_write.literal_value), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(addr, for_write), codegen


@intrinsic
def cpu_relax(typingctx):
    """x86 PAUSE: a busy-wait turn that lets the other CPU's writes to the lines we poll land first,
    instead of our reads stealing those lines back from the driver over and over."""

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


def _make_fence(ordering: str):
    @intrinsic
    def fence(typingctx):
        def codegen(context, builder, signature, args):
            builder.fence(ordering)
            return context.get_dummy_value()

        return types.void(), codegen

    return fence


# acquire: read ring entries only after the index that published them (virtio_rmb).
fence_acquire = _make_fence("acquire")
# release: publish an index only after the entries it covers (virtio_wmb).
fence_release = _make_fence("release")
# full: order a store before a later load, for event-index checks (virtio_mb).
fence_full = _make_fence("seq_cst")


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``llvm.readcyclecounter``: rdtsc on x86), as int64: per-request time stamps
    for a few nanoseconds each, where a clock_gettime through Python would cost a microsecond."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


def call_libc(context, builder, name, values, value_types, arg_bits):
    """Emit, inside an intrinsic's codegen, a call to libc's ``name`` (int result, as int64) with integer
    arguments of the given widths (a pointer is a 64-bit integer).

    The symbol is only declared in the generated module; the JIT linker resolves it in the running
    process (libc is always loaded), so the compiled code can be cached like any other.
    """
    fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(bits) for bits in arg_bits])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    args = []
    for value, value_type, bits in zip(values, value_types, arg_bits, strict=True):
        wide = context.cast(builder, value, value_type, types.int64)
        args.append(builder.trunc(wide, ir.IntType(bits)) if bits < 64 else wide)
    return builder.sext(builder.call(fn, args), ir.IntType(64))
