"""virtio-net data path, compiled: each TX frame is looped back to RX or answered by a responder.

``net_tx_burst`` processes up to ``budget`` TX chains of one queue pair in one call. The device
behaviour follows the kernel's vdpa_sim_net: a frame passes the receive filter if its destination is
broadcast, multicast, the device MAC or (an extension driven by the control queue) in the MAC table
or the device is promiscuous; a filtered frame counts as an RX drop, a frame with no RX buffer as
an RX overrun (and the burst stops until the driver posts buffers).

Responder mode answers ARP requests and ICMP echo requests for ``peer_ip`` as the host ``peer_mac``
would, so a guest can ping it; anything else the guest sends is consumed and counted.

``net_tx_discard`` serves a pair one of whose queues is disabled (started but told to have no side
effects, vhost-user SET_VRING_ENABLE 0): TX chains are consumed and dropped, nothing is received.
With dirty logging on, every byte written into RX buffers is logged (jit/log.py).
"""

from __future__ import annotations

import numpy as np

from ..rings.state import RingStatus
from . import kernel
from .chain import iov_copy, iov_fill, iov_gather, iov_length
from .intrinsics import cpu_relax, load_relaxed_u64, load_u8, memset, store_u8, store_u32, store_u64
from .log import log_host, log_iov
from .vq import vq_disable_notify, vq_needs_notify, vq_pop, vq_prefetch, vq_publish, vq_push

__all__ = [
    "NET_PARAMS",
    "MODE_LOOPBACK",
    "MODE_RESPONDER",
    "new_net_params",
    "net_tx_burst",
    "net_poll",
    "net_tx_discard",
    "SCRATCH_BYTES",
]

MODE_LOOPBACK, MODE_RESPONDER = 0, 1

# Layout of the int64 parameter array the control plane fills (devices/net.py).
P_HDR_LEN, P_MERGEABLE, P_MODE, P_PROMISC, P_PEER_IP, P_PEER_MAC, P_MAC_COUNT, P_ALLMULTI = range(8)
P_MAC_TABLE = 8  # MAC addresses as 48-bit integers (network order), the device MAC first
MAC_TABLE_SIZE = 64
NET_PARAMS = P_MAC_TABLE + MAC_TABLE_SIZE

# Chains ahead whose descriptors are fetched (buffers: half as far), so cache misses on the driver's
# lines overlap rather than stall one frame at a time.
PREFETCH_AHEAD = 8
# PAUSEs after a poll that found nothing: fewer reads of the lines the driver is writing while it fills
# the ring, at the price of a few tens of nanoseconds before the next frame is seen.
IDLE_PAUSES = 4
SCRATCH_BYTES = 65536 + 64  # the largest frame the responder gathers (GSO-free, 64 KiB)

_OK = int(RingStatus.OK)
_EMPTY = int(RingStatus.EMPTY)
_NO_BUFFER = int(RingStatus.NO_BUFFER)
_FAULT = int(RingStatus.ADDR_OUT_OF_RANGE)  # this and every status above it: the driver broke the ring

_ETH_HLEN = 14
_BROADCAST = 0xFFFFFFFFFFFF
_ETH_P_ARP = 0x0806
_ETH_P_IP = 0x0800
_IPPROTO_ICMP = 1


def new_net_params() -> np.ndarray:
    params = np.zeros(NET_PARAMS, dtype=np.int64)
    params[P_ALLMULTI] = 1  # vdpa_sim_net passes every multicast frame; CTRL_RX ALLMULTI off makes the table count
    return params


@kernel(inline=True)
def _mac_at(addr):
    """48-bit MAC at a host address, most significant byte first."""
    value = 0
    for i in range(6):
        value = value << 8 | load_u8(addr + i)
    return value


@kernel(inline=True)
def _destination(iov_tx, readable, hdr_len, scratch_addr):
    """The frame's destination MAC: read in place when the first buffer holds it (the usual case)."""
    if readable and iov_tx[0, 1] >= hdr_len + 6:
        return _mac_at(iov_tx[0, 0] + hdr_len)
    iov_gather(iov_tx, 0, readable, hdr_len, scratch_addr, 6)
    return _mac_at(scratch_addr)


@kernel(inline=True)
def _accepts(params, dest):
    """The receive filter of vdpa_sim_net, plus promiscuous mode, all-multicast and the MAC table."""
    if params[P_PROMISC] or dest == _BROADCAST:
        return True
    if dest >> 40 & 1 and params[P_ALLMULTI]:  # group bit: multicast
        return True
    for i in range(params[P_MAC_COUNT]):  # noqa: SIM110 - compiled code: no generators
        if params[P_MAC_TABLE + i] == dest:
            return True
    return False


@kernel
def net_tx_burst(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, budget):
    """Move up to ``budget`` TX frames. Returns (status, TX chains consumed, notify TX, notify RX)."""
    txq = txq_state[0]
    rxq = rxq_state[0]
    hdr_len = params[P_HDR_LEN]
    scratch_addr = scratch.ctypes.data
    status = _OK
    done = 0
    rx_pushed = 0
    while done < budget:
        status, head, ndesc, _, readable = vq_pop(txq, rows, iov_tx)
        if status != _OK:
            break
        # Only with traffic: an idle poll must not touch lines the driver is about to write.
        vq_prefetch(txq, rows, PREFETCH_AHEAD, 0)
        vq_prefetch(rxq, rows, PREFETCH_AHEAD, 0)  # read, not write: a prefetchw steals the line from the driver
        done += 1
        frame_len = iov_length(iov_tx, 0, readable) - hdr_len
        if frame_len < _ETH_HLEN:
            txq.errors += 1
            vq_push(txq, head, ndesc, 0)
            continue
        txq.packets += 1
        txq.bytes += frame_len
        if params[P_MODE] == MODE_RESPONDER:
            iov_gather(iov_tx, 0, readable, hdr_len, scratch_addr, min(frame_len, scratch.shape[0]))
            reply_len = _respond(scratch_addr, min(frame_len, scratch.shape[0]), params)
            vq_push(txq, head, ndesc, 0)
            if reply_len == 0:
                continue
            src, src_first, src_last, src_skip, length = _scratch_as_iov(scratch_addr, reply_len, iov_tx)
        else:
            if not _accepts(params, _destination(iov_tx, readable, hdr_len, scratch_addr)):
                rxq.drops += 1
                vq_push(txq, head, ndesc, 0)
                continue
            src, src_first, src_last, src_skip, length = iov_tx, 0, readable, hdr_len, frame_len
        rx_status, buffers = _receive(rxq, rows, iov_rx, src, src_first, src_last, src_skip, length, params)
        if rx_status == _EMPTY:
            rxq.overruns += 1
        elif rx_status != _OK:
            status = rx_status
            break
        else:
            rx_pushed += buffers
        if params[P_MODE] != MODE_RESPONDER:
            vq_push(txq, head, ndesc, 0)
        if rx_status == _EMPTY:
            status = _NO_BUFFER
            break
    if status == _EMPTY:
        status = _OK
    vq_publish(txq)
    vq_publish(rxq)
    notify_tx = done > 0 and vq_needs_notify(txq)
    notify_rx = rx_pushed > 0 and vq_needs_notify(rxq)
    return status, done, notify_tx, notify_rx


@kernel
def net_poll(txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, budget, interrupt, max_bursts, idle_polls):
    """Busy-poll a queue pair: bursts of ``net_tx_burst`` back to back, with kicks off on both queues.

    Returns (status, TX chains consumed, notify TX, notify RX) when the driver must be notified, a queue
    faulted, the control plane raised ``interrupt[0]``, ``max_bursts`` bursts ran (other queues get a
    turn) or ``idle_polls`` polls in a row found nothing. One call covers thousands of bursts, so the
    Python around it costs nothing per frame.
    """
    txq = txq_state[0]
    rxq = rxq_state[0]
    vq_disable_notify(txq)
    vq_disable_notify(rxq)
    interrupt_addr = interrupt.ctypes.data
    status = _OK
    total = 0
    notify_tx = False
    notify_rx = False
    idle = 0
    for _ in range(max_bursts):
        if load_relaxed_u64(interrupt_addr):
            break
        status, done, notify_tx, notify_rx = net_tx_burst(
            txq_state, rxq_state, rows, iov_tx, iov_rx, scratch, params, budget
        )
        total += done
        if status >= _FAULT or txq.error or rxq.error or notify_tx or notify_rx:
            break
        if done:
            idle = 0
        else:
            idle += 1
            if idle >= idle_polls:
                break
            for _ in range(IDLE_PAUSES):
                cpu_relax()
    return status, total, notify_tx, notify_rx


@kernel
def net_tx_discard(txq_state, rxq_state, rows, iov_tx, params, budget, tx_disabled):
    """Consume up to ``budget`` TX chains and deliver nothing. Returns (status, TX chains consumed, notify TX).

    ``tx_disabled``: the TX queue is disabled, its frames count as TX drops. Otherwise the RX queue is
    disabled: the frames were sent (TX packets and bytes) but the receiver took none (RX drops).
    """
    txq = txq_state[0]
    rxq = rxq_state[0]
    hdr_len = params[P_HDR_LEN]
    status = _OK
    done = 0
    while done < budget:
        status, head, ndesc, _, readable = vq_pop(txq, rows, iov_tx)
        if status != _OK:
            break
        done += 1
        if tx_disabled:
            txq.drops += 1
        else:
            frame_len = iov_length(iov_tx, 0, readable) - hdr_len
            if frame_len < _ETH_HLEN:
                txq.errors += 1
            else:
                txq.packets += 1
                txq.bytes += frame_len
                rxq.drops += 1
        vq_push(txq, head, ndesc, 0)
    if status == _EMPTY:
        status = _OK
    vq_publish(txq)
    notify_tx = done > 0 and vq_needs_notify(txq)
    return status, done, notify_tx


@kernel(inline=True)
def _scratch_as_iov(scratch_addr, length, iov_tx):
    """Describe the scratch reply as a one-row iov, reusing the last row of the TX iov array."""
    last = iov_tx.shape[0] - 1
    iov_tx[last, 0] = scratch_addr
    iov_tx[last, 1] = length
    iov_tx[last, 2] = 0
    return iov_tx, last, last + 1, 0, length


@kernel(inline=True)
def _receive(rxq, rows, iov_rx, src, src_first, src_last, src_skip, length, params):
    """Deliver one frame into RX buffers, merging several when MRG_RXBUF is on. Returns (status, buffers)."""
    hdr_len = params[P_HDR_LEN]
    mergeable = params[P_MERGEABLE]
    offset = 0  # frame bytes delivered so far
    buffers = 0
    num_buffers_lo = 0  # host addresses of the header's num_buffers bytes (the header may span rows)
    num_buffers_hi = 0
    while True:
        status, head, ndesc, n, readable = vq_pop(rxq, rows, iov_rx)
        if status != _OK:
            if buffers == 0:
                return status, 0
            # Out of buffers mid-frame: hand back what we have, truncated and counted.
            rxq.errors += 1
            break
        room = iov_length(iov_rx, readable, n)
        hdr_here = hdr_len if buffers == 0 else 0
        if room < hdr_here:
            rxq.errors += 1
            vq_push(rxq, head, ndesc, 0)
            buffers += 1
            return _OK, buffers
        if buffers == 0:
            # A fresh header: no offloads are offered, so only num_buffers (v1 header) carries data.
            if hdr_len >= 12:
                num_buffers_lo = _byte_address(iov_rx, readable, n, 10)
                num_buffers_hi = _byte_address(iov_rx, readable, n, 11)
            _zero_header(iov_rx, readable, n, hdr_len)
        chunk = iov_copy(iov_rx, readable, n, hdr_here, src, src_first, src_last, src_skip + offset, length - offset)
        offset += chunk
        if rxq.log:
            log_iov(rxq, rows, iov_rx, readable, n, hdr_here + chunk)
        vq_push(rxq, head, ndesc, hdr_here + chunk)
        buffers += 1
        if offset == length:
            break
        if not mergeable:
            rxq.errors += 1  # frame larger than the buffer: truncated, as vdpa_sim_net does
            break
    if hdr_len >= 12:
        store_u8(num_buffers_lo, buffers)
        store_u8(num_buffers_hi, buffers >> 8)
        if rxq.log:  # logged again: the bit must follow the last write to the page
            log_host(rxq, rows, num_buffers_lo, 1)
            log_host(rxq, rows, num_buffers_hi, 1)
    rxq.packets += 1
    rxq.bytes += offset
    return _OK, buffers


@kernel(inline=True)
def _byte_address(iov, first, last, offset):
    """Host address of byte ``offset`` of iov rows [first, last); the caller checked they hold it."""
    for i in range(first, last):
        if offset < iov[i, 1]:
            return iov[i, 0] + offset
        offset -= iov[i, 1]
    return 0


@kernel(inline=True)
def _zero_header(iov_rx, first, last, hdr_len):
    # The header usually sits in the first writable buffer; fill across rows when it is split.
    if hdr_len == 12 and iov_rx[first, 1] >= 12:  # the v1 header: two stores, not a memset call
        store_u64(iov_rx[first, 0], 0)
        store_u32(iov_rx[first, 0] + 8, 0)
    elif iov_rx[first, 1] >= hdr_len:
        memset(iov_rx[first, 0], 0, hdr_len)
    else:
        iov_fill(iov_rx, first, last, 0, 0, hdr_len)


@kernel
def _checksum(addr, length):
    """The Internet checksum (RFC 1071) of [addr, addr+length)."""
    total = 0
    for i in range(0, length - 1, 2):
        total += load_u8(addr + i) << 8 | load_u8(addr + i + 1)
    if length & 1:
        total += load_u8(addr + length - 1) << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@kernel(inline=True)
def _be16(addr):
    return load_u8(addr) << 8 | load_u8(addr + 1)


@kernel(inline=True)
def _put_be16(addr, value):
    store_u8(addr, value >> 8)
    store_u8(addr + 1, value)


@kernel(inline=True)
def _put_mac(addr, mac):
    for i in range(6):
        store_u8(addr + i, mac >> (40 - 8 * i))


@kernel(inline=True)
def _swap(addr_a, addr_b, length):
    for i in range(length):
        a = load_u8(addr_a + i)
        store_u8(addr_a + i, load_u8(addr_b + i))
        store_u8(addr_b + i, a)


@kernel
def _respond(frame, length, params):
    """Turn the frame at ``frame`` into the peer's answer in place; returns its length, 0 for no answer."""
    peer_ip = params[P_PEER_IP]
    peer_mac = params[P_PEER_MAC]
    ethertype = _be16(frame + 12)
    if ethertype == _ETH_P_ARP and length >= _ETH_HLEN + 28:
        arp = frame + _ETH_HLEN
        is_ipv4_over_ethernet = _be16(arp) == 1 and _be16(arp + 2) == _ETH_P_IP and load_u8(arp + 4) == 6
        target_ip = _be16(arp + 24) << 16 | _be16(arp + 26)
        if not is_ipv4_over_ethernet or _be16(arp + 6) != 1 or target_ip != peer_ip:
            return 0
        _swap(arp + 8, arp + 18, 10)  # sender <-> target hardware and protocol addresses
        _put_mac(arp + 8, peer_mac)  # the answer: peer_ip is at peer_mac
        _put_be16(arp + 6, 2)  # ARP reply
        _reply_ethernet_header(frame, peer_mac)
        return _ETH_HLEN + 28
    if ethertype == _ETH_P_IP and length >= _ETH_HLEN + 20:
        ip = frame + _ETH_HLEN
        ihl = (load_u8(ip) & 0xF) * 4
        total_len = _be16(ip + 2)
        dest_ip = _be16(ip + 16) << 16 | _be16(ip + 18)
        if load_u8(ip) >> 4 != 4 or ihl < 20 or total_len < ihl + 8 or _ETH_HLEN + total_len > length:
            return 0
        if load_u8(ip + 9) != _IPPROTO_ICMP or dest_ip != peer_ip:
            return 0
        icmp = ip + ihl
        if load_u8(icmp) != 8 or _checksum(icmp, total_len - ihl) != 0:  # echo request, intact
            return 0
        _swap(ip + 12, ip + 16, 4)
        store_u8(ip + 8, 64)  # TTL
        _put_be16(ip + 10, 0)
        _put_be16(ip + 10, _checksum(ip, ihl))
        store_u8(icmp, 0)  # echo reply
        _put_be16(icmp + 2, 0)
        _put_be16(icmp + 2, _checksum(icmp, total_len - ihl))
        _reply_ethernet_header(frame, peer_mac)
        return _ETH_HLEN + total_len
    return 0


@kernel(inline=True)
def _reply_ethernet_header(frame, peer_mac):
    """Ethernet header of a reply: back to the sender, from the peer."""
    for i in range(6):
        store_u8(frame + i, load_u8(frame + 6 + i))
    _put_mac(frame + 6, peer_mac)
