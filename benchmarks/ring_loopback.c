/*
 * ring_loopback.c - the C reference of `vdpasim bench rings`.
 *
 * One thread plays both sides of a virtio-net queue pair in loopback, exactly as the Numba side of
 * the benchmark does (vdpasim/bench/rings.py driving vdpasim/jit/net.py):
 *
 *   driver:  stamp a sequence number into each TX frame, post TX descriptors and RX buffers, publish
 *            them (split: one avail index store per burst; packed: flags stored last per descriptor),
 *            run the device, then reap every used entry of both queues, checking ids, lengths, the
 *            RX header's num_buffers and the sequence number of every received frame, and re-arm
 *            the used-buffer notification (split used_event / packed off_wrap + RING_EVENT_FLAGS_DESC).
 *   device:  the semantics of net_tx_burst in loopback mode, check for check: region-table
 *            translation with bounds and write-permission checks, the avail-index guard, the chain
 *            walk (loop, index, order, length, indirect rules), the receive filter (broadcast,
 *            all-multicast, MAC table, promiscuous), a fresh RX header with num_buffers, per-packet used
 *            entries, one used-index publish per burst, counters, and the notification decision.
 *
 * Queue state is the very numpy record the Numba kernels use (QUEUE_DTYPE), so both sides start from
 * the same state; the Python side checks the field list below against it, and checks that a run of
 * each side leaves byte-identical ring memory, buffers and queue records.
 * The responder mode of net_tx_burst is not needed by the benchmark: its mode checks stay in the
 * loop, but a responder-mode parameter block makes the call fail with BAD_REQUEST.
 *
 * Built at run time with `gcc -O2 -shared -fPIC`.
 */
#include <stdint.h>
#include <string.h>

/* Must equal vdpasim.rings.state.QUEUE_DTYPE, field for field (checked by the Python side). */
const char ring_queue_fields[] =
    "size,packed,event_idx,indirect,desc_addr,driver_addr,device_addr,desc,driver,device,"
    "last_avail,avail_wrap,used_idx,used_wrap,used_head_flags,used_head_pos,signalled_used,signalled_valid,error,error_index,error_addr,"
    "packets,bytes,errors,overruns,drops,requests,successes,kicks,notifications,"
    "log,log_size,log_ring,log_used,log_desc,inflight,inflight_counter,inflight_entry";

struct vq {
    int64_t size, packed, event_idx, indirect;
    int64_t desc_addr, driver_addr, device_addr;
    int64_t desc, driver, device;
    int64_t last_avail, avail_wrap, used_idx, used_wrap;
    int64_t used_head_flags, used_head_pos;  /* packed: the batch head's flags, written at the publish */
    int64_t signalled_used, signalled_valid;
    int64_t error, error_index, error_addr;
    int64_t packets, bytes, errors, overruns, drops, requests, successes, kicks, notifications;
    int64_t log, log_size, log_ring, log_used, log_desc;  /* dirty logging: off (0) in the benchmark */
    int64_t inflight, inflight_counter, inflight_entry;    /* inflight tracking: blk only */
};

/* Parameter block of vdpasim.jit.net (checked by the Python side). */
const char ring_net_params[] =
    "P_HDR_LEN=0,P_MERGEABLE=1,P_MODE=2,P_PROMISC=3,P_MAC_COUNT=6,P_ALLMULTI=7,P_MAC_TABLE=8";
enum { P_HDR_LEN = 0, P_MERGEABLE = 1, P_MODE = 2, P_PROMISC = 3, P_MAC_COUNT = 6, P_ALLMULTI = 7, P_MAC_TABLE = 8 };
enum { MODE_LOOPBACK = 0, MODE_RESPONDER = 1 };

/* RingStatus. */
enum {
    OK = 0, EMPTY = 1, NO_BUFFER = 2, ADDR_OUT_OF_RANGE = 10, INDEX_OUT_OF_RANGE = 11, AVAIL_IDX_AHEAD = 12,
    CHAIN_LOOP = 13, CHAIN_TOO_LONG = 14, LENGTH_OVERFLOW = 15, NESTED_INDIRECT = 16, INDIRECT_WITH_NEXT = 17,
    BAD_INDIRECT_LENGTH = 18, INDIRECT_NOT_NEGOTIATED = 19, WRITE_BEFORE_READ = 20, READ_ONLY_MEMORY = 21,
    BAD_REQUEST = 22,
};

/* Region table columns (vdpasim.memory). */
enum { GUEST = 0, SIZE = 1, USER = 2, HOST = 3, FLAGS = 4, ROW = 5 };
#define REGION_WRITABLE 1
#define TRANSLATE_READ_ONLY (-1)

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_DESC_F_AVAIL (1 << 7)
#define VIRTQ_DESC_F_USED (1 << 15)
#define RING_EVENT_FLAGS_DISABLE 1
#define RING_EVENT_FLAGS_DESC 2

#define DESC_SIZE 16
#define USED_HEAD_PENDING (1 << 16)
#define MAX_CHAIN_BYTES 0xFFFFFFFFLL
#define ETH_HLEN 14

/* iov rows: (host address, length, writable). */
enum { IOV_ADDR = 0, IOV_LEN = 1, IOV_WRITABLE = 2, IOV_ROW = 3 };

/* Ring memory is read and written through host addresses, like the Numba intrinsics. */
static inline int64_t load_u8(int64_t a) { return *(const uint8_t *)(uintptr_t)a; }
static inline void store_u8(int64_t a, int64_t v) { *(uint8_t *)(uintptr_t)a = (uint8_t)v; }
static inline int64_t load_u16(int64_t a) { uint16_t v; memcpy(&v, (const void *)(uintptr_t)a, 2); return v; }
static inline int64_t load_u32(int64_t a) { uint32_t v; memcpy(&v, (const void *)(uintptr_t)a, 4); return v; }
static inline int64_t load_u64(int64_t a) { int64_t v; memcpy(&v, (const void *)(uintptr_t)a, 8); return v; }
static inline void store_u16(int64_t a, int64_t v) { uint16_t x = (uint16_t)v; memcpy((void *)(uintptr_t)a, &x, 2); }
static inline void store_u32(int64_t a, int64_t v) { uint32_t x = (uint32_t)v; memcpy((void *)(uintptr_t)a, &x, 4); }
static inline void store_u64(int64_t a, int64_t v) { memcpy((void *)(uintptr_t)a, &v, 8); }
#define fence_acquire() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define fence_release() __atomic_thread_fence(__ATOMIC_RELEASE)
#define fence_full() __atomic_thread_fence(__ATOMIC_SEQ_CST)

struct mem {
    const int64_t *rows;
    int64_t nrows;
};

struct iov {
    int64_t *rows;
    int64_t cap;
};

/* ---- memory.py: translate ---- */

static inline int64_t translate(struct mem m, int64_t addr, int64_t length, int writable)
{
    for (int64_t i = 0; i < m.nrows; i++) {
        const int64_t *row = m.rows + ROW * i;
        int64_t offset = (int64_t)((uint64_t)addr - (uint64_t)row[GUEST]);
        if (0 <= offset && offset <= row[SIZE] - length) {
            if (writable && !(row[FLAGS] & REGION_WRITABLE))
                return TRANSLATE_READ_ONLY;
            return row[HOST] + offset;
        }
    }
    return 0;
}

/* ---- chain.py ---- */

static int64_t fail(struct vq *q, int64_t status, int64_t index, int64_t addr)
{
    if (q->error == OK) {
        q->error = status;
        q->error_index = index;
        q->error_addr = addr;
    }
    return status;
}

struct walk {
    int64_t n, readable, total;
};

static inline int64_t add_buffer(struct vq *q, struct mem m, struct iov iov, struct walk *w, int64_t addr,
                                 int64_t length, int64_t flags, int64_t index)
{
    int writable = (flags & VIRTQ_DESC_F_WRITE) != 0;
    if (!writable && w->n > w->readable)
        return fail(q, WRITE_BEFORE_READ, index, addr);
    w->total += length;
    if (w->total > MAX_CHAIN_BYTES)
        return fail(q, LENGTH_OVERFLOW, index, addr);
    if (length == 0)
        return OK;
    if (w->n >= iov.cap)
        return fail(q, CHAIN_TOO_LONG, index, addr);
    int64_t host = translate(m, addr, length, writable);
    if (host == 0)
        return fail(q, ADDR_OUT_OF_RANGE, index, addr);
    if (host == TRANSLATE_READ_ONLY)
        return fail(q, READ_ONLY_MEMORY, index, addr);
    int64_t *row = iov.rows + IOV_ROW * w->n;
    row[IOV_ADDR] = host;
    row[IOV_LEN] = length;
    row[IOV_WRITABLE] = writable;
    w->n += 1;
    w->readable += writable ? 0 : 1;
    return OK;
}

static inline int64_t iov_length(struct iov iov, int64_t first, int64_t last)
{
    int64_t total = 0;
    for (int64_t i = first; i < last; i++)
        total += iov.rows[IOV_ROW * i + IOV_LEN];
    return total;
}

static int64_t iov_gather(struct iov iov, int64_t first, int64_t last, int64_t skip, int64_t dst, int64_t length)
{
    int64_t copied = 0;
    for (int64_t i = first; i < last; i++) {
        int64_t size = iov.rows[IOV_ROW * i + IOV_LEN];
        if (skip >= size) {
            skip -= size;
            continue;
        }
        int64_t chunk = size - skip < length - copied ? size - skip : length - copied;
        memcpy((void *)(uintptr_t)(dst + copied), (const void *)(uintptr_t)(iov.rows[IOV_ROW * i + IOV_ADDR] + skip),
               (size_t)chunk);
        copied += chunk;
        skip = 0;
        if (copied == length)
            break;
    }
    return copied;
}

static int64_t iov_copy(struct iov dst, int64_t d, int64_t dst_last, int64_t dst_skip, struct iov src, int64_t s,
                        int64_t src_last, int64_t src_skip, int64_t length)
{
    int64_t copied = 0;
    while (d < dst_last && dst_skip >= dst.rows[IOV_ROW * d + IOV_LEN]) {
        dst_skip -= dst.rows[IOV_ROW * d + IOV_LEN];
        d++;
    }
    while (s < src_last && src_skip >= src.rows[IOV_ROW * s + IOV_LEN]) {
        src_skip -= src.rows[IOV_ROW * s + IOV_LEN];
        s++;
    }
    while (d < dst_last && s < src_last && copied < length) {
        int64_t dlen = dst.rows[IOV_ROW * d + IOV_LEN], slen = src.rows[IOV_ROW * s + IOV_LEN];
        int64_t chunk = dlen - dst_skip;
        if (slen - src_skip < chunk)
            chunk = slen - src_skip;
        if (length - copied < chunk)
            chunk = length - copied;
        memcpy((void *)(uintptr_t)(dst.rows[IOV_ROW * d + IOV_ADDR] + dst_skip),
               (const void *)(uintptr_t)(src.rows[IOV_ROW * s + IOV_ADDR] + src_skip), (size_t)chunk);
        copied += chunk;
        dst_skip += chunk;
        src_skip += chunk;
        if (dst_skip == dlen) {
            d++;
            dst_skip = 0;
        }
        if (src_skip == slen) {
            s++;
            src_skip = 0;
        }
    }
    return copied;
}

/* ---- split.py ---- */

struct pop {
    int64_t status, head, ndesc, n, readable;
};

static int64_t split_walk(struct vq *q, struct mem m, int64_t head, struct iov iov, struct walk *w)
{
    if (head >= q->size)
        return fail(q, INDEX_OUT_OF_RANGE, head, 0);
    int64_t table = q->desc;
    int64_t count = q->size; /* more visits than descriptors in the table: a loop */
    int64_t index = head;
    int64_t visited = 0;
    int indirect = 0;
    w->n = w->readable = w->total = 0;
    for (;;) {
        int64_t desc = table + DESC_SIZE * index;
        int64_t addr = load_u64(desc);
        int64_t length = load_u32(desc + 8);
        int64_t flags = load_u16(desc + 12);
        visited += 1;
        if (visited > count)
            return fail(q, CHAIN_LOOP, index, addr);
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            if (!q->indirect)
                return fail(q, INDIRECT_NOT_NEGOTIATED, index, addr);
            if (indirect)
                return fail(q, NESTED_INDIRECT, index, addr);
            if (flags & VIRTQ_DESC_F_NEXT)
                return fail(q, INDIRECT_WITH_NEXT, index, addr);
            if (length == 0 || length % DESC_SIZE)
                return fail(q, BAD_INDIRECT_LENGTH, index, addr);
            table = translate(m, addr, length, 0);
            if (table == 0)
                return fail(q, ADDR_OUT_OF_RANGE, index, addr);
            indirect = 1;
            count = length / DESC_SIZE;
            index = 0;
            visited = 0;
            continue;
        }
        int64_t status = add_buffer(q, m, iov, w, addr, length, flags, index);
        if (status != OK)
            return status;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            return OK;
        index = load_u16(desc + 14);
        if (index >= count)
            return fail(q, INDEX_OUT_OF_RANGE, index, addr);
    }
}

static struct pop split_pop(struct vq *q, struct mem m, struct iov iov)
{
    struct pop r = {EMPTY, 0, 0, 0, 0};
    int64_t avail_idx = load_u16(q->driver + 2);
    if (avail_idx == q->last_avail)
        return r;
    if (((avail_idx - q->last_avail) & 0xFFFF) > q->size) {
        r.status = fail(q, AVAIL_IDX_AHEAD, avail_idx, 0);
        return r;
    }
    fence_acquire();
    int64_t head = load_u16(q->driver + 4 + 2 * (q->last_avail & (q->size - 1)));  /* sizes are powers of two */
    struct walk w;
    r.status = split_walk(q, m, head, iov, &w);
    r.head = head;
    if (r.status != OK)
        return r;
    q->last_avail = (q->last_avail + 1) & 0xFFFF;
    r.ndesc = 1;
    r.n = w.n;
    r.readable = w.readable;
    return r;
}

static inline void split_push(struct vq *q, int64_t head, int64_t written)
{
    int64_t elem = q->device + 4 + 8 * (q->used_idx & (q->size - 1));
    store_u32(elem, head);
    store_u32(elem + 4, written);
    q->used_idx = (q->used_idx + 1) & 0xFFFF;
}

static inline void split_publish(struct vq *q)
{
    fence_release();
    store_u16(q->device + 2, q->used_idx);
}

static int split_needs_notify(struct vq *q)
{
    if (q->signalled_valid && q->signalled_used == q->used_idx)
        return 0;
    fence_full();
    int64_t old = q->signalled_used, new = q->used_idx, valid = q->signalled_valid;
    q->signalled_used = new;
    q->signalled_valid = 1;
    if (q->event_idx) {
        int64_t used_event = load_u16(q->driver + 4 + 2 * q->size);
        return !valid || ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF);
    }
    return !(load_u16(q->driver) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

/* ---- packed.py ---- */

static inline int is_available(int64_t flags, int64_t wrap)
{
    return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == wrap && ((flags & VIRTQ_DESC_F_USED) != 0) != wrap;
}

static int64_t walk_indirect(struct vq *q, struct mem m, struct iov iov, struct walk *w, int64_t addr, int64_t length,
                             int64_t flags, int64_t position)
{
    if (!q->indirect)
        return fail(q, INDIRECT_NOT_NEGOTIATED, position, addr);
    if (flags & VIRTQ_DESC_F_NEXT)
        return fail(q, INDIRECT_WITH_NEXT, position, addr);
    if (length == 0 || length % DESC_SIZE)
        return fail(q, BAD_INDIRECT_LENGTH, position, addr);
    int64_t table = translate(m, addr, length, 0);
    if (table == 0)
        return fail(q, ADDR_OUT_OF_RANGE, position, addr);
    for (int64_t index = 0; index < length / DESC_SIZE; index++) {
        int64_t desc = table + DESC_SIZE * index;
        int64_t inner_addr = load_u64(desc);
        int64_t inner_flags = load_u16(desc + 14);
        if (inner_flags & VIRTQ_DESC_F_INDIRECT)
            return fail(q, NESTED_INDIRECT, index, inner_addr);
        int64_t status = add_buffer(q, m, iov, w, inner_addr, load_u32(desc + 8), inner_flags, index);
        if (status != OK)
            return status;
    }
    return OK;
}

static struct pop packed_pop(struct vq *q, struct mem m, struct iov iov)
{
    struct pop r = {EMPTY, 0, 0, 0, 0};
    int64_t position = q->last_avail, wrap = q->avail_wrap;
    if (!is_available(load_u16(q->desc + DESC_SIZE * position + 14), wrap))
        return r;
    fence_acquire();
    struct walk w = {0, 0, 0};
    int64_t ndesc = 0, addr, buffer_id, flags, status;
    for (;;) {
        int64_t desc = q->desc + DESC_SIZE * position;
        addr = load_u64(desc);
        int64_t length = load_u32(desc + 8);
        buffer_id = load_u16(desc + 12);
        flags = load_u16(desc + 14);
        ndesc += 1;
        if (ndesc > q->size) {
            r.status = fail(q, CHAIN_LOOP, position, addr);
            return r;
        }
        if (flags & VIRTQ_DESC_F_INDIRECT)
            status = walk_indirect(q, m, iov, &w, addr, length, flags, position);
        else
            status = add_buffer(q, m, iov, &w, addr, length, flags, position);
        if (status != OK) {
            r.status = status;
            return r;
        }
        position += 1;
        if (position == q->size) {
            position = 0;
            wrap ^= 1;
        }
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
    }
    if (buffer_id >= q->size) {
        r.status = fail(q, INDEX_OUT_OF_RANGE, buffer_id, addr);
        return r;
    }
    q->last_avail = position;
    q->avail_wrap = wrap;
    r.status = OK;
    r.head = buffer_id;
    r.ndesc = ndesc;
    r.n = w.n;
    r.readable = w.readable;
    return r;
}

static inline void packed_push(struct vq *q, int64_t buffer_id, int64_t ndesc, int64_t written)
{
    int64_t desc = q->desc + DESC_SIZE * q->used_idx;
    store_u32(desc + 8, written);
    store_u16(desc + 12, buffer_id);
    fence_release();
    /* WRITE says the device wrote data; without it the driver ignores len (§2.8.3, §2.8.4). */
    int64_t flags = q->used_wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0;
    if (written)
        flags |= VIRTQ_DESC_F_WRITE;
    if (!q->used_head_flags) {
        q->used_head_flags = USED_HEAD_PENDING | flags;
        q->used_head_pos = q->used_idx;
    } else {
        store_u16(desc + 14, flags);
    }
    q->used_idx += ndesc;
    if (q->used_idx >= q->size) {
        q->used_idx -= q->size;
        q->used_wrap ^= 1;
    }
}

static int packed_needs_notify(struct vq *q)
{
    int64_t new = q->used_idx | q->used_wrap << 15;
    if (q->signalled_valid && q->signalled_used == new)
        return 0;
    fence_full();
    int64_t old = q->signalled_used, valid = q->signalled_valid;
    q->signalled_used = new;
    q->signalled_valid = 1;
    int64_t flags = load_u16(q->driver + 2) & 3;
    if (flags == RING_EVENT_FLAGS_DISABLE)
        return 0;
    if (flags != RING_EVENT_FLAGS_DESC || !q->event_idx)
        return 1;
    if (!valid)
        return 1;
    int64_t off_wrap = load_u16(q->driver);
    int64_t event = off_wrap & 0x7FFF;
    if (off_wrap >> 15 != q->used_wrap)
        event -= q->size;
    int64_t old_idx = old & 0x7FFF;
    if (old >> 15 != q->used_wrap)
        old_idx -= q->size;
    return ((q->used_idx - event - 1) & 0xFFFF) < ((q->used_idx - old_idx) & 0xFFFF);
}

/* ---- vq.py ---- */

static inline struct pop vq_pop(struct vq *q, struct mem m, struct iov iov)
{
    return q->packed ? packed_pop(q, m, iov) : split_pop(q, m, iov);
}

static inline void vq_push(struct vq *q, int64_t head, int64_t ndesc, int64_t written)
{
    if (q->packed)
        packed_push(q, head, ndesc, written);
    else
        split_push(q, head, written);
}

static inline void packed_publish(struct vq *q)
{
    if (q->used_head_flags) {
        fence_release();
        store_u16(q->desc + DESC_SIZE * q->used_head_pos + 14, q->used_head_flags & 0xFFFF);
        q->used_head_flags = 0;
    }
}

static inline void vq_publish(struct vq *q)
{
    if (q->packed)
        packed_publish(q);
    else
        split_publish(q);
}

static inline int vq_needs_notify(struct vq *q)
{
    return q->packed ? packed_needs_notify(q) : split_needs_notify(q);
}

/* ---- net.py ---- */

static inline int64_t mac_at(int64_t addr)
{
    int64_t value = 0;
    for (int i = 0; i < 6; i++)
        value = value << 8 | load_u8(addr + i);
    return value;
}

#define BROADCAST 0xFFFFFFFFFFFFLL

static int accepts(const int64_t *params, int64_t dest)
{
    if (params[P_PROMISC] || dest == BROADCAST)
        return 1;
    if ((dest >> 40 & 1) && params[P_ALLMULTI]) /* group bit: multicast */
        return 1;
    for (int64_t i = 0; i < params[P_MAC_COUNT]; i++)
        if (params[P_MAC_TABLE + i] == dest)
            return 1;
    return 0;
}

static inline int64_t byte_address(struct iov iov, int64_t first, int64_t last, int64_t offset)
{
    for (int64_t i = first; i < last; i++) {
        if (offset < iov.rows[IOV_ROW * i + IOV_LEN])
            return iov.rows[IOV_ROW * i + IOV_ADDR] + offset;
        offset -= iov.rows[IOV_ROW * i + IOV_LEN];
    }
    return 0;
}

static int64_t iov_fill(struct iov iov, int64_t first, int64_t last, int64_t skip, int byte, int64_t length)
{
    int64_t done = 0;
    for (int64_t i = first; i < last; i++) {
        int64_t size = iov.rows[IOV_ROW * i + IOV_LEN];
        if (skip >= size) {
            skip -= size;
            continue;
        }
        int64_t chunk = size - skip < length - done ? size - skip : length - done;
        memset((void *)(uintptr_t)(iov.rows[IOV_ROW * i + IOV_ADDR] + skip), byte, (size_t)chunk);
        done += chunk;
        skip = 0;
        if (done == length)
            break;
    }
    return done;
}

static void zero_header(struct iov iov_rx, int64_t first, int64_t last, int64_t hdr_len)
{
    if (iov_rx.rows[IOV_ROW * first + IOV_LEN] >= hdr_len) {
        memset((void *)(uintptr_t)iov_rx.rows[IOV_ROW * first + IOV_ADDR], 0, (size_t)hdr_len);
    } else {
        iov_fill(iov_rx, first, last, 0, 0, hdr_len);
    }
}

struct rx {
    int64_t status, buffers;
};

static struct rx receive(struct vq *rxq, struct mem m, struct iov iov_rx, struct iov src, int64_t src_first,
                         int64_t src_last, int64_t src_skip, int64_t length, const int64_t *params)
{
    int64_t hdr_len = params[P_HDR_LEN], mergeable = params[P_MERGEABLE];
    int64_t offset = 0, buffers = 0;
    int64_t num_buffers_lo = 0, num_buffers_hi = 0; /* the header may span iov rows */
    for (;;) {
        struct pop p = vq_pop(rxq, m, iov_rx);
        if (p.status != OK) {
            if (buffers == 0)
                return (struct rx){p.status, 0};
            rxq->errors += 1;
            break;
        }
        int64_t room = iov_length(iov_rx, p.readable, p.n);
        int64_t hdr_here = buffers == 0 ? hdr_len : 0;
        if (room < hdr_here) {
            rxq->errors += 1;
            vq_push(rxq, p.head, p.ndesc, 0);
            return (struct rx){OK, buffers + 1};
        }
        if (buffers == 0) {
            if (hdr_len >= 12) {
                num_buffers_lo = byte_address(iov_rx, p.readable, p.n, 10);
                num_buffers_hi = byte_address(iov_rx, p.readable, p.n, 11);
            }
            zero_header(iov_rx, p.readable, p.n, hdr_len);
        }
        int64_t chunk = iov_copy(iov_rx, p.readable, p.n, hdr_here, src, src_first, src_last, src_skip + offset,
                                 length - offset);
        offset += chunk;
        vq_push(rxq, p.head, p.ndesc, hdr_here + chunk);
        buffers += 1;
        if (offset == length)
            break;
        if (!mergeable) {
            rxq->errors += 1;
            break;
        }
    }
    if (hdr_len >= 12) {
        store_u8(num_buffers_lo, buffers);
        store_u8(num_buffers_hi, buffers >> 8);
    }
    rxq->packets += 1;
    rxq->bytes += offset;
    return (struct rx){OK, buffers};
}

struct burst {
    int64_t status, done, notify_tx, notify_rx;
};

static struct burst net_tx_burst(struct vq *txq, struct vq *rxq, struct mem m, struct iov iov_tx, struct iov iov_rx,
                                 int64_t scratch_addr, const int64_t *params, int64_t budget)
{
    int64_t hdr_len = params[P_HDR_LEN];
    int64_t status = OK, done = 0, rx_pushed = 0;
    while (done < budget) {
        struct pop p = vq_pop(txq, m, iov_tx);
        status = p.status;
        if (status != OK)
            break;
        done += 1;
        int64_t frame_len = iov_length(iov_tx, 0, p.readable) - hdr_len;
        if (frame_len < ETH_HLEN) {
            txq->errors += 1;
            vq_push(txq, p.head, p.ndesc, 0);
            continue;
        }
        txq->packets += 1;
        txq->bytes += frame_len;
        if (params[P_MODE] == MODE_RESPONDER) {
            status = BAD_REQUEST; /* not part of the benchmark */
            break;
        }
        iov_gather(iov_tx, 0, p.readable, hdr_len, scratch_addr, 6);
        if (!accepts(params, mac_at(scratch_addr))) {
            rxq->drops += 1;
            vq_push(txq, p.head, p.ndesc, 0);
            continue;
        }
        struct rx r = receive(rxq, m, iov_rx, iov_tx, 0, p.readable, hdr_len, frame_len, params);
        if (r.status == EMPTY) {
            rxq->overruns += 1;
        } else if (r.status != OK) {
            status = r.status;
            break;
        } else {
            rx_pushed += r.buffers;
        }
        if (params[P_MODE] != MODE_RESPONDER)
            vq_push(txq, p.head, p.ndesc, 0);
        if (r.status == EMPTY) {
            status = NO_BUFFER;
            break;
        }
    }
    if (status == EMPTY)
        status = OK;
    vq_publish(txq);
    vq_publish(rxq);
    int notify_tx = done > 0 && vq_needs_notify(txq);
    int notify_rx = rx_pushed > 0 && vq_needs_notify(rxq);
    return (struct burst){status, done, notify_tx, notify_rx};
}

/* ---- the driver (vdpasim/bench/rings.py: split_loopback, packed_loopback) ---- */

/* Layout block shared with the Python side (L_* there). */
enum {
    L_TX_DESC, L_TX_DRIVER, L_TX_DEVICE, L_RX_DESC, L_RX_DRIVER, L_RX_DEVICE,
    L_TX_BUF_GUEST, L_TX_BUF_HOST, L_RX_BUF_GUEST, L_RX_BUF_HOST, L_STRIDE, L_FRAME_LEN, L_RX_BUF_LEN, L_SIZE,
};
/* Result block (R_* there). */
enum { R_STATUS, R_TX_REAPED, R_RX_REAPED, R_BAD, R_NOTIFICATIONS, R_SEQ_SUM };

#define HDR_LEN 12
#define SEQ_OFFSET (HDR_LEN + ETH_HLEN) /* the sequence number sits right after the Ethernet header */

struct args {
    struct vq *txq, *rxq;
    struct mem m;
    struct iov iov_tx, iov_rx;
    int64_t scratch;
    const int64_t *params;
    const int64_t *lay;
    int64_t bursts, burst;
    int64_t *result;
};

static void split_loopback(struct args *a)
{
    const int64_t *lay = a->lay;
    int64_t size = lay[L_SIZE], stride = lay[L_STRIDE], frame_len = lay[L_FRAME_LEN], rx_len = lay[L_RX_BUF_LEN];
    int64_t tx_desc = lay[L_TX_DESC], tx_avail = lay[L_TX_DRIVER], tx_used = lay[L_TX_DEVICE];
    int64_t rx_desc = lay[L_RX_DESC], rx_avail = lay[L_RX_DRIVER], rx_used = lay[L_RX_DEVICE];
    int64_t tx_buf = lay[L_TX_BUF_GUEST], tx_host = lay[L_TX_BUF_HOST];
    int64_t rx_buf = lay[L_RX_BUF_GUEST], rx_host = lay[L_RX_BUF_HOST];
    int64_t tx_next = 0, rx_next = 0, tx_last_used = 0, rx_last_used = 0;
    int64_t sent = 0, tx_reaped = 0, rx_reaped = 0, bad = 0, notifications = 0, seq_sum = 0, status = OK;
    for (int64_t b = 0; b < a->bursts; b++) {
        for (int64_t i = 0; i < a->burst; i++) {
            int64_t slot = tx_next % size;
            store_u64(tx_host + stride * slot + SEQ_OFFSET, sent);
            sent += 1;
            int64_t desc = tx_desc + DESC_SIZE * slot;
            store_u64(desc, tx_buf + stride * slot);
            store_u32(desc + 8, HDR_LEN + frame_len);
            store_u16(desc + 12, 0);
            store_u16(desc + 14, 0);
            store_u16(tx_avail + 4 + 2 * slot, slot);
            tx_next = (tx_next + 1) & 0xFFFF;
        }
        fence_release();
        store_u16(tx_avail + 2, tx_next);
        for (int64_t i = 0; i < a->burst; i++) {
            int64_t slot = rx_next % size;
            int64_t desc = rx_desc + DESC_SIZE * slot;
            store_u64(desc, rx_buf + stride * slot);
            store_u32(desc + 8, rx_len);
            store_u16(desc + 12, VIRTQ_DESC_F_WRITE);
            store_u16(desc + 14, 0);
            store_u16(rx_avail + 4 + 2 * slot, slot);
            rx_next = (rx_next + 1) & 0xFFFF;
        }
        fence_release();
        store_u16(rx_avail + 2, rx_next);

        struct burst r = net_tx_burst(a->txq, a->rxq, a->m, a->iov_tx, a->iov_rx, a->scratch, a->params, a->burst);
        if (r.status != OK || r.done != a->burst) {
            status = r.status != OK ? r.status : NO_BUFFER;
            break;
        }
        notifications += r.notify_tx + r.notify_rx;

        int64_t used = load_u16(tx_used + 2);
        fence_acquire();
        while (tx_last_used != used) {
            int64_t slot = tx_last_used % size;
            int64_t elem = tx_used + 4 + 8 * slot;
            if (load_u32(elem) != slot || load_u32(elem + 4) != 0)
                bad += 1;
            tx_last_used = (tx_last_used + 1) & 0xFFFF;
            tx_reaped += 1;
        }
        store_u16(tx_avail + 4 + 2 * size, tx_last_used); /* used_event: interrupt on the next one */
        used = load_u16(rx_used + 2);
        fence_acquire();
        while (rx_last_used != used) {
            int64_t slot = rx_last_used % size;
            int64_t elem = rx_used + 4 + 8 * slot;
            int64_t buf = rx_host + stride * load_u32(elem);
            int64_t seq = load_u64(buf + SEQ_OFFSET);
            if (load_u32(elem) != slot || load_u32(elem + 4) != HDR_LEN + frame_len || load_u16(buf + 10) != 1 ||
                seq != rx_reaped)
                bad += 1;
            seq_sum += seq;
            rx_last_used = (rx_last_used + 1) & 0xFFFF;
            rx_reaped += 1;
        }
        store_u16(rx_avail + 4 + 2 * size, rx_last_used);
    }
    a->result[R_STATUS] = status;
    a->result[R_TX_REAPED] = tx_reaped;
    a->result[R_RX_REAPED] = rx_reaped;
    a->result[R_BAD] = bad;
    a->result[R_NOTIFICATIONS] = notifications;
    a->result[R_SEQ_SUM] = seq_sum;
}

/* A used descriptor has AVAIL and USED both equal to the driver's used wrap counter. */
static inline int is_used(int64_t flags, int64_t wrap)
{
    return ((flags & VIRTQ_DESC_F_AVAIL) != 0) == wrap && ((flags & VIRTQ_DESC_F_USED) != 0) == wrap;
}

static void packed_loopback(struct args *a)
{
    const int64_t *lay = a->lay;
    int64_t size = lay[L_SIZE], stride = lay[L_STRIDE], frame_len = lay[L_FRAME_LEN], rx_len = lay[L_RX_BUF_LEN];
    int64_t tx_desc = lay[L_TX_DESC], tx_driver = lay[L_TX_DRIVER];
    int64_t rx_desc = lay[L_RX_DESC], rx_driver = lay[L_RX_DRIVER];
    int64_t tx_buf = lay[L_TX_BUF_GUEST], tx_host = lay[L_TX_BUF_HOST];
    int64_t rx_buf = lay[L_RX_BUF_GUEST], rx_host = lay[L_RX_BUF_HOST];
    int64_t tx_next = 0, tx_wrap = 1, rx_next = 0, rx_wrap = 1;
    int64_t tx_used = 0, tx_used_wrap = 1, rx_used = 0, rx_used_wrap = 1;
    int64_t sent = 0, tx_reaped = 0, rx_reaped = 0, bad = 0, notifications = 0, seq_sum = 0, status = OK;
    /* Ask for used-buffer notifications at a given position (EVENT_IDX), starting at the first. */
    store_u16(tx_driver, 1 << 15); /* off_wrap: position 0, wrap counter 1 */
    store_u16(tx_driver + 2, RING_EVENT_FLAGS_DESC);
    store_u16(rx_driver, 1 << 15);
    store_u16(rx_driver + 2, RING_EVENT_FLAGS_DESC);
    for (int64_t b = 0; b < a->bursts; b++) {
        for (int64_t i = 0; i < a->burst; i++) {
            int64_t slot = tx_next;
            store_u64(tx_host + stride * slot + SEQ_OFFSET, sent);
            sent += 1;
            int64_t desc = tx_desc + DESC_SIZE * slot;
            store_u64(desc, tx_buf + stride * slot);
            store_u32(desc + 8, HDR_LEN + frame_len);
            store_u16(desc + 12, slot);
            fence_release();
            store_u16(desc + 14, tx_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED);
            tx_next += 1;
            if (tx_next == size) {
                tx_next = 0;
                tx_wrap ^= 1;
            }
        }
        for (int64_t i = 0; i < a->burst; i++) {
            int64_t slot = rx_next;
            int64_t desc = rx_desc + DESC_SIZE * slot;
            store_u64(desc, rx_buf + stride * slot);
            store_u32(desc + 8, rx_len);
            store_u16(desc + 12, slot);
            fence_release();
            store_u16(desc + 14, VIRTQ_DESC_F_WRITE | (rx_wrap ? VIRTQ_DESC_F_AVAIL : VIRTQ_DESC_F_USED));
            rx_next += 1;
            if (rx_next == size) {
                rx_next = 0;
                rx_wrap ^= 1;
            }
        }

        struct burst r = net_tx_burst(a->txq, a->rxq, a->m, a->iov_tx, a->iov_rx, a->scratch, a->params, a->burst);
        if (r.status != OK || r.done != a->burst) {
            status = r.status != OK ? r.status : NO_BUFFER;
            break;
        }
        notifications += r.notify_tx + r.notify_rx;

        for (;;) {
            int64_t desc = tx_desc + DESC_SIZE * tx_used;
            int64_t flags = load_u16(desc + 14);
            if (!is_used(flags, tx_used_wrap))
                break;
            fence_acquire();
            if (load_u16(desc + 12) != tx_used || load_u32(desc + 8) != 0)
                bad += 1;
            tx_reaped += 1;
            tx_used += 1;
            if (tx_used == size) {
                tx_used = 0;
                tx_used_wrap ^= 1;
            }
        }
        store_u16(tx_driver, tx_used | tx_used_wrap << 15); /* off_wrap: interrupt on the next one */
        for (;;) {
            int64_t desc = rx_desc + DESC_SIZE * rx_used;
            int64_t flags = load_u16(desc + 14);
            if (!is_used(flags, rx_used_wrap))
                break;
            fence_acquire();
            int64_t id = load_u16(desc + 12);
            int64_t buf = rx_host + stride * id;
            int64_t seq = load_u64(buf + SEQ_OFFSET);
            if (id != rx_used || load_u32(desc + 8) != HDR_LEN + frame_len || load_u16(buf + 10) != 1 ||
                seq != rx_reaped)
                bad += 1;
            seq_sum += seq;
            rx_reaped += 1;
            rx_used += 1;
            if (rx_used == size) {
                rx_used = 0;
                rx_used_wrap ^= 1;
            }
        }
        store_u16(rx_driver, rx_used | rx_used_wrap << 15);
    }
    a->result[R_STATUS] = status;
    a->result[R_TX_REAPED] = tx_reaped;
    a->result[R_RX_REAPED] = rx_reaped;
    a->result[R_BAD] = bad;
    a->result[R_NOTIFICATIONS] = notifications;
    a->result[R_SEQ_SUM] = seq_sum;
}

/* Entry point: run `bursts` bursts of `burst` packets; the layout picks split or packed. */
void ring_loopback(struct vq *txq, struct vq *rxq, const int64_t *rows, int64_t nrows, int64_t *iov_tx,
                   int64_t *iov_rx, int64_t iov_cap, uint8_t *scratch, const int64_t *params, const int64_t *lay,
                   int64_t bursts, int64_t burst, int64_t *result)
{
    struct args a = {
        txq, rxq, {rows, nrows}, {iov_tx, iov_cap}, {iov_rx, iov_cap}, (int64_t)(uintptr_t)scratch,
        params, lay, bursts, burst, result,
    };
    if (txq->packed)
        packed_loopback(&a);
    else
        split_loopback(&a);
}
