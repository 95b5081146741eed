"""The virtio-net device (VIRTIO 1.2 §5.1): config space, queue roles, control queue, data-path modes.

Queues are laid out as the spec says: receiveq1, transmitq1, ..., receiveqN, transmitqN, then the
control queue. N is ``max_vqp`` when VIRTIO_NET_F_MQ is negotiated, else 1, so the control queue is
queue 2N (queue 2 without MQ, whatever ``max_vqp`` is). Only the first ``curr_queue_pairs`` pairs are
served; the driver raises that with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (§5.1.6.5.5).

A kick on a transmit queue or on its receive queue runs the compiled ``net_tx_burst`` for that pair
(RX buffers arriving can unblock frames that overran). A busy-polling device instead runs ``net_poll``
on each pair's transmit queue: the polling loop itself is compiled and comes back to Python only to
notify, on a fault, to give other queues a turn, or when the control plane interrupts it.

The counters are the kernel vdpa_sim_net's vstats, read from the queue records: the "rx ..." ones from
receive queues, the "tx ..." ones from transmit queues, the "cvq ..." ones from the control queue.

A pair one of whose queues is disabled (``set_vq_enabled``, vhost-user SET_VRING_ENABLE 0) is served
without side effects, as the vhost-user spec asks of a disabled ring: TX frames are consumed and
dropped ("tx drops" when the TX queue is disabled, "rx drops" when the RX queue is), and nothing is
written into the RX queue.

Everything that runs on the data-path thread (``process`` and the control commands it applies)
never takes the device lock: the control plane holds that lock while it waits for the thread to park.
"""

from __future__ import annotations

import dataclasses
import errno
import struct

import numpy as np

from ..config import NetConfig, format_mac, parse_mac
from ..errors import DeviceRequestError
from ..jit.net import (
    MAC_TABLE_SIZE,
    MODE_LOOPBACK,
    MODE_RESPONDER,
    P_ALLMULTI,
    P_HDR_LEN,
    P_MAC_COUNT,
    P_MAC_TABLE,
    P_MERGEABLE,
    P_MODE,
    P_PEER_IP,
    P_PEER_MAC,
    P_PROMISC,
    SCRATCH_BYTES,
    net_poll,
    net_tx_burst,
    net_tx_discard,
    new_net_params,
)
from ..jit.vq import vq_disable_notify, vq_enable_notify, vq_has_avail
from ..rings.state import RingStatus, SplitState, VqState
from ..virtio import constants as c
from ..virtqueue import Virtqueue
from .core import SimDevice
from .cvq import ControlQueue, CtrlCommand, CtrlError, MacAddrSet, MacTableSet, RxFilter, RxModeSet, VqPairsSet

__all__ = ["NetDevice", "RX_STATS", "TX_STATS", "CVQ_STATS", "BURST", "NET_CONFIG_SIZE"]

# vdpa_sim_net's vstats names, and the queue record field behind each.
RX_STATS = {
    "rx packets": "packets",
    "rx bytes": "bytes",
    "rx errors": "errors",
    "rx overruns": "overruns",
    "rx drops": "drops",
}
TX_STATS = {"tx packets": "packets", "tx bytes": "bytes", "tx errors": "errors", "tx drops": "drops"}
CVQ_STATS = {"cvq requests": "requests", "cvq successes": "successes", "cvq errors": "errors"}

BURST = 64  # TX chains per kernel call: large enough to amortise the call, small enough to stay fair
# Busy-poll: a compiled loop serves a pair for up to POLL_BURSTS bursts (other queues then get a turn),
# or until POLL_IDLE polls in a row found nothing (~0.1 ms), before it comes back to Python.
POLL_BURSTS = 4096
POLL_IDLE = 2048

# struct virtio_net_config up to mtu (§5.1.4): mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu.
_CONFIG = struct.Struct("<6sHHH")
NET_CONFIG_SIZE = _CONFIG.size
_FAULT = int(RingStatus.ADDR_OUT_OF_RANGE)
_NO_BUFFER = int(RingStatus.NO_BUFFER)


def _mac_int(mac: bytes) -> int:
    return int.from_bytes(mac, "big")


class NetDevice(SimDevice):
    """A virtio-net device whose data path loops TX back to RX or answers as a peer (``NetConfig.mode``)."""

    device_id = c.VIRTIO_ID_NET

    def __init__(self, config: NetConfig) -> None:
        self.config = config
        self.filter = RxFilter(config.mac)
        self.params = new_net_params()
        self.curr_queue_pairs = 1
        self._negotiated = 0
        self._scratch: list[np.ndarray | None] = [None] * config.max_vqp
        self.control = ControlQueue(self._apply_ctrl, self._log_refusal)
        self.restarted = False  # re-created by a restarted daemon from its state file (vdpasim/state.py)
        self.restart_drops: dict[int, int] = {}  # TX queue -> frames no counter saw across daemon restarts
        self._tx_checkpoint: dict[int, int] = {}  # TX queue -> its last_avail in the dead daemon's state file
        super().__init__(
            config.name,
            features=config.features,
            num_queues=config.num_queues,
            max_queue_size=config.max_queue_size,
            busy_poll=config.busy_poll,
        )
        self._write_params()

    # ----- queue roles -----
    @property
    def max_vqp(self) -> int:
        return self.config.max_vqp

    @property
    def cvq_index(self) -> int | None:
        """The control queue's index under the negotiated (before FEATURES_OK: offered) features."""
        features = self._negotiated or self.device_features
        if not features >> c.VIRTIO_NET_F_CTRL_VQ & 1:
            return None
        return 2 * self.max_vqp if features >> c.VIRTIO_NET_F_MQ & 1 else 2

    def queue_role(self, idx: int) -> str | None:
        """``"rx"``, ``"tx"`` or ``"cvq"`` for queue ``idx``; None for an index with no role."""
        if idx == self.cvq_index:
            return "cvq"
        if 0 <= idx < 2 * self.max_vqp:
            return "tx" if idx & 1 else "rx"
        return None

    # ----- config space -----
    @property
    def mac(self) -> bytes:
        """The MAC the device filters on and shows in config space."""
        return self.filter.mac

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.filter.mac, c.VIRTIO_NET_S_LINK_UP, self.max_vqp, self.config.mtu)

    def write_config(self, offset: int, data: bytes) -> None:
        # The spec makes net config read-only, but legacy paths and QEMU's vhost-vdpa realize write the
        # MAC there; accept that and ignore writes to the other (read-only) fields, as hardware does.
        space = bytearray(self.config_space())
        space[offset : offset + len(data)] = data
        mac = bytes(space[:6])
        if mac != self.filter.mac:
            self.log.info("driver wrote mac %s to config space", format_mac(mac))
            with self.datapath.paused():  # the filter table must not change under a running burst
                self._set_filter_mac(mac)

    def set_mac(self, mac: str | bytes) -> None:
        """Management side (``vdpa dev set ... mac``): the device MAC, kept across resets."""
        mac = parse_mac(mac)
        if mac[0] & 1:
            raise DeviceRequestError(f"{self.name}: mac {format_mac(mac)} is a multicast address")
        with self._lock, self.datapath.paused():
            self.config = dataclasses.replace(self.config, mac=mac)
            self._set_filter_mac(mac)

    def _set_filter_mac(self, mac: bytes) -> None:
        changed = mac != self.filter.mac
        self.filter.mac = mac
        self._write_params()
        if changed:
            self.config_changed()

    # ----- life cycle hooks -----
    def on_features(self, features: int) -> None:
        self._negotiated = features
        self._write_params()

    def on_reset(self) -> None:
        mac_before = self.filter.mac
        self.filter = RxFilter(self.config.mac)
        self.curr_queue_pairs = 1
        self._negotiated = 0
        self._write_params()
        if mac_before != self.filter.mac:
            self.config_changed()

    # ----- receive filter and data-path parameters -----
    def _write_params(self) -> None:
        """Fill the compiled data path's parameter array from the config and the control-queue state."""
        params = self.params
        params[P_HDR_LEN] = c.VIRTIO_NET_HDR_LEN  # modern only: always the v1 header
        params[P_MERGEABLE] = self._negotiated >> c.VIRTIO_NET_F_MRG_RXBUF & 1
        params[P_MODE] = MODE_RESPONDER if self.config.mode == "responder" else MODE_LOOPBACK
        params[P_PEER_IP] = self.config.peer_ip_int
        params[P_PEER_MAC] = _mac_int(self.config.peer_mac)
        rx = self.filter
        promisc, allmulti = rx.promisc, rx.allmulti
        table = [rx.mac]
        # A table too large for the filter is treated as "receive them all", as QEMU's overflow flags do.
        if len(rx.unicast) > MAC_TABLE_SIZE - 1:
            promisc = True
        else:
            table += rx.unicast
        if len(table) + len(rx.multicast) > MAC_TABLE_SIZE:
            allmulti = True
        else:
            table += rx.multicast
        params[P_PROMISC] = promisc
        params[P_ALLMULTI] = allmulti
        params[P_MAC_COUNT] = len(table)
        params[P_MAC_TABLE : P_MAC_TABLE + len(table)] = [_mac_int(mac) for mac in table]

    # ----- data path (runs on the data-path thread) -----
    def process(self, idx: int) -> bool:
        role = self.queue_role(idx)
        if role == "cvq":
            return self._process_cvq(self.vqs[idx])
        if role is None or idx // 2 >= self._pairs_served():
            return False
        if self.datapath.busy_poll and role == "rx":
            return False  # the poll of its transmit queue serves the pair; RX buffers alone move nothing
        return self._process_pair(idx // 2)

    def _pairs_served(self) -> int:
        cvq = self.cvq_index
        if cvq is None or self.vqs[cvq].ready:
            return self.curr_queue_pairs
        # MQ with a control queue the driver never set up: a front-end that runs the control queue
        # itself (QEMU's vhost-user-net) picks the pairs by enabling their rings, so serve every
        # ready pair.
        return self.max_vqp if self._negotiated >> c.VIRTIO_NET_F_MQ & 1 else 1

    def _scratch_for(self, pair: int) -> np.ndarray:
        scratch = self._scratch[pair]
        if scratch is None:
            scratch = self._scratch[pair] = np.zeros(SCRATCH_BYTES, dtype=np.uint8)
        return scratch

    def _process_pair(self, pair: int) -> bool:
        rx, tx = self.vqs[2 * pair], self.vqs[2 * pair + 1]
        memory = self.memory
        if memory is None or not tx.attached:
            return False
        if tx.enabled is False or (rx.enabled is False and rx.attached):
            return self._discard_pair(pair, tx, rx, memory.rows)
        if not rx.attached:
            return False
        if self.datapath.busy_poll:
            return self._poll_pair(pair, tx, rx, memory.rows)
        status, done, notify_tx, notify_rx = net_tx_burst(
            tx.state, rx.state, memory.rows, tx.iov, rx.iov, self._scratch_for(pair), self.params, BURST
        )
        if not self._signal_or_fail(tx, rx, status, notify_tx, notify_rx):
            return False
        if done == BURST:
            return True
        # Drained, or out of RX buffers: ask for kicks on both queues, then look again, since the
        # driver may have added buffers before it could see the request (§2.7.10, §2.8.10).
        tx_more = self._arm(tx)
        rx_more = self._arm(rx)
        return tx_more and (rx_more or status != _NO_BUFFER)

    def _poll_pair(self, pair: int, tx: Virtqueue, rx: Virtqueue, rows: np.ndarray) -> bool:
        """Busy-poll mode: the compiled loop spins on the pair; back here only to notify, fail or yield."""
        status, _done, notify_tx, notify_rx = net_poll(
            tx.state,
            rx.state,
            rows,
            tx.iov,
            rx.iov,
            self._scratch_for(pair),
            self.params,
            BURST,
            self.datapath.interrupt,
            POLL_BURSTS,
            POLL_IDLE,
        )
        # Back to notify: go on at once. Otherwise it yielded, went idle or was interrupted.
        return self._signal_or_fail(tx, rx, status, notify_tx, notify_rx) and bool(notify_tx or notify_rx)

    def _signal_or_fail(self, tx: Virtqueue, rx: Virtqueue, status: int, notify_tx: bool, notify_rx: bool) -> bool:
        """After a pair's kernel: signal the driver as it asked; False if a queue faulted (NEEDS_RESET)."""
        if notify_tx:
            self.notify(tx.index)
        if notify_rx:
            self.notify(rx.index)
        if status >= _FAULT or tx.record["error"] or rx.record["error"]:
            self.check_queue(tx)
            self.check_queue(rx)
            return False
        return True

    def _discard_pair(self, pair: int, tx: Virtqueue, rx: Virtqueue, rows: np.ndarray) -> bool:
        """A queue of the pair is disabled: consume TX, deliver nothing (the RX queue is never written)."""
        status, done, notify_tx = net_tx_discard(
            tx.state, rx.state, rows, tx.iov, self.params, BURST, int(tx.enabled is False)
        )
        if notify_tx:
            self.notify(tx.index)
        if status >= _FAULT or tx.record["error"]:
            self.check_queue(tx)
            return False
        if done == BURST:
            return True
        return self._arm(tx)

    def _arm(self, vq: Virtqueue) -> bool:
        if self.datapath.busy_poll:
            vq_disable_notify(vq.record)  # the thread polls: spare the driver its kicks
            return False
        vq_enable_notify(vq.record)
        return bool(vq_has_avail(vq.record))

    def _process_cvq(self, vq: Virtqueue) -> bool:
        memory = self.memory
        if memory is None or not vq.attached or vq.enabled is False:
            return False
        status, notify = self.control.serve(vq, memory.rows, self._negotiated, self.max_vqp)
        if notify:
            self.notify(vq.index)
        if status >= _FAULT or vq.record["error"]:
            self.check_queue(vq)
            return False
        return self._arm(vq)

    def _log_refusal(self, message: str, *args: object) -> None:
        self.log.warning(message, *args)

    def _apply_ctrl(self, command: CtrlCommand) -> None:
        if isinstance(command, MacAddrSet):
            self.log.info("control queue: mac %s", format_mac(command.mac))
            self._set_filter_mac(command.mac)
        elif isinstance(command, MacTableSet | RxModeSet):
            self.filter.apply(command)
            self._write_params()
        elif isinstance(command, VqPairsSet):
            self.log.info("control queue: %d queue pairs", command.pairs)
            self.curr_queue_pairs = command.pairs
            self.datapath.wake()  # serve the newly enabled pairs once: kicks may have come before
        else:  # parse_ctrl only returns the types above
            raise CtrlError(f"no handler for {command!r}")

    # ----- after a daemon restart -----
    def restore_after_restart(self, queues: list[dict[str, int]], status: int, features: int) -> None:
        """The device was re-created from a state file whose queues are ``queues`` (at ``status``, with the
        driver's ``features``).

        Frames the guest queued for transmission while no daemon served the device are dropped by the
        front-end (QEMU's virtio-net drops TX with the link down) and frames the dead daemon sent after
        its last checkpoint were counted by nobody. Both moved the transmit ring on, so the first
        SET_VRING_BASE of the reconnected front-end, compared with the ring position in the state file,
        tells how many there were: they are added to "tx drops" and reported as "tx restart drops".
        """
        self.restarted = True
        for idx, saved in enumerate(queues[: len(self.vqs)]):
            if self.queue_role(idx) == "tx":
                self.restart_drops[idx] = int(saved.get("restart_drops", 0))
                if status & c.VIRTIO_CONFIG_S_DRIVER_OK and not features >> c.VIRTIO_F_RING_PACKED & 1:
                    self._tx_checkpoint[idx] = int(saved.get("last_avail", 0))

    def set_vq_state(self, idx: int, state: VqState) -> None:
        checkpoint = self._tx_checkpoint.pop(idx, None)
        if checkpoint is not None and isinstance(state, SplitState):
            gap = (state.last_avail - checkpoint) & 0xFFFF
            if gap:
                self.restart_drops[idx] = self.restart_drops.get(idx, 0) + gap
                self.vqs[idx].record["drops"] += gap
                self.log.info("vq %d: %d frames sent by the guest across the restart were not counted: drops", idx, gap)
        super().set_vq_state(idx, state)

    # ----- management -----
    def vstats(self, qidx: int) -> dict[str, int]:
        """Vendor statistics of queue ``qidx`` with vdpa_sim_net's names (``vdpa dev vstats show``)."""
        role = self.queue_role(qidx) if 0 <= qidx < len(self.vqs) else None
        if role is None:
            raise DeviceRequestError(f"{self.name}: no queue {qidx} to report statistics for", errno=errno.EINVAL)
        names = {"rx": RX_STATS, "tx": TX_STATS, "cvq": CVQ_STATS}[role]
        record = self.vqs[qidx].record
        stats = {name: int(record[field]) for name, field in names.items()}
        if self.restarted and role == "tx":
            stats["tx restart drops"] = self.restart_drops.get(qidx, 0)
        return stats
