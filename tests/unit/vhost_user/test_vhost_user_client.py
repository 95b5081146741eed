"""VhostUserClient against a scripted back-end: the exact requests each operation sends, and how the
client takes a back-end that answers out of turn, hangs up, stays silent or lacks the extension.

The scripted back-end is a thread on the other end of a socketpair that records every message and
answers from a table; it knows nothing of devices, so what is checked is the wire, message by message.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable

import pytest

from bridge.vhost_user import messages as m
from bridge.vhost_user.client import VhostUserClient
from bridge.vhost_user.codec import close_fds
from bridge.vhost_user.messages import FrontendRequest as F
from bridge.vhost_user.messages import Message
from bridge.vhost_user.messages import ProtocolFeature as P
from bridge.vhost_user.transport import MessageStream
from vdpasim.errors import DeviceRequestError, SessionError, TransportError
from vdpasim.ops import supports
from vdpasim.rings.state import SplitState
from vdpasim.testing.driver import GuestMemory
from vdpasim.virtio import constants as c

NET_FEATURES = 1 << c.VIRTIO_F_VERSION_1 | 1 << c.VIRTIO_NET_F_MAC
Answer = Callable[[Message], m.Payload | None]


class ScriptedBackend:
    """Answers GET requests from ``answers`` (payload, or a function of the request), acks the rest."""

    def __init__(self, answers: dict[F, m.Payload | Answer], *, protocol_features: int) -> None:
        self.answers = {
            F.GET_FEATURES: m.U64(NET_FEATURES | 1 << c.VHOST_USER_F_PROTOCOL_FEATURES),
            F.GET_PROTOCOL_FEATURES: m.U64(protocol_features),
            **answers,
        }
        self.received: list[Message] = []
        self.front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stream = MessageStream(back)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (message := self.stream.receive()) is not None:
                close_fds(message.fds)
                self.received.append(message)
                answer = self.answers.get(message.request)  # type: ignore[call-overload]
                if callable(answer):
                    answer = answer(message)
                if answer == "hang up":
                    break
                if answer == "silence":
                    continue
                if answer is not None:
                    self.stream.send(Message(message.request, answer, reply=True))
                elif message.need_reply:
                    self.stream.send(Message(message.request, m.U64(0), reply=True))
        except TransportError:
            pass
        finally:
            self.stream.close()

    def requests(self) -> list[F]:
        """Every request received, once the client has left (requests without a reply may still be in flight)."""
        self.thread.join(30)
        return [message.request for message in self.received]

    def close(self) -> None:
        self.front.close()
        self.thread.join()


@pytest.fixture
def scripted():
    made: list[ScriptedBackend] = []

    def make(answers: dict | None = None, *, protocol_features: int = 0) -> ScriptedBackend:
        backend = ScriptedBackend(answers or {}, protocol_features=protocol_features)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


EXTENSION = 1 << P.VDPA | 1 << P.REPLY_ACK | 1 << P.STATUS
EXTENSION_ANSWERS = {F.VDPA_GET_VQS_COUNT: m.U64(3), F.GET_STATUS: m.U64(0)}


def test_the_handshake_negotiates_what_both_know_and_nothing_more(scripted) -> None:
    backend = scripted(EXTENSION_ANSWERS, protocol_features=EXTENSION | 1 << P.LOG_SHMFD | 1 << 40)
    with VhostUserClient(sock=backend.front) as client:
        assert not supports(client, "get_vq_num_min")  # optional, and no wire can ask for it
        assert client.protocol_features == EXTENSION
        assert client.device_features == NET_FEATURES
        assert client.get_vq_count() == 3
    assert backend.requests() == [
        F.GET_FEATURES,
        F.GET_PROTOCOL_FEATURES,
        F.SET_PROTOCOL_FEATURES,
        F.SET_OWNER,
        F.VDPA_GET_VQS_COUNT,
    ]
    assert backend.received[2].payload == m.U64(EXTENSION)


def test_the_extension_is_dropped_without_reply_ack(scripted) -> None:
    backend = scripted(protocol_features=1 << P.VDPA | 1 << P.STATUS)
    with VhostUserClient(sock=backend.front) as client:
        assert not client.negotiated(P.VDPA) and client.negotiated(P.STATUS)
        assert not supports(client, "suspend")


def test_features_ok_sends_set_features_with_an_ack_then_the_status(scripted) -> None:
    status = {"value": 0}

    def set_status(message: Message) -> None:
        status["value"] = message.payload.value  # type: ignore[attr-defined]

    backend = scripted(
        {**EXTENSION_ANSWERS, F.GET_STATUS: lambda _: m.U64(status["value"]), F.SET_STATUS: set_status},
        protocol_features=EXTENSION,
    )
    up = c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
    with VhostUserClient(sock=backend.front) as client:
        client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        client.set_status(up)
        client.set_driver_features(NET_FEATURES)
        start = len(backend.received)
        client.set_status(up | c.VIRTIO_CONFIG_S_FEATURES_OK)
        sent = backend.received[start:]
    assert [(x.request, x.payload, x.need_reply) for x in sent] == [
        (F.GET_STATUS, m.Empty(), False),
        (F.SET_FEATURES, m.U64(NET_FEATURES | 1 << c.VHOST_USER_F_PROTOCOL_FEATURES), True),
        (F.SET_STATUS, m.U64(up | c.VIRTIO_CONFIG_S_FEATURES_OK), True),
    ]


def test_a_nacked_set_features_keeps_features_ok_out_of_the_status(scripted) -> None:
    status = {"value": c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER}
    backend = scripted(
        {
            **EXTENSION_ANSWERS,
            F.GET_STATUS: lambda _: m.U64(status["value"]),
            F.SET_FEATURES: m.U64(errno.EINVAL),  # a NACK
            F.SET_STATUS: lambda msg: status.update(value=msg.payload.value),
        },
        protocol_features=EXTENSION,
    )
    with VhostUserClient(sock=backend.front) as client:
        client.set_driver_features(NET_FEATURES)
        client.set_status(status["value"] | c.VIRTIO_CONFIG_S_FEATURES_OK)
        assert client.get_status() == c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
    assert backend.received[-2].payload == m.U64(c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER)


def test_ring_operations_and_the_messages_they_become(scripted) -> None:
    backend = scripted(
        {**EXTENSION_ANSWERS, F.GET_VRING_BASE: lambda msg: m.VringState(msg.payload.index, 9)},  # type: ignore[attr-defined]
        protocol_features=EXTENSION,
    )
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with VhostUserClient(sock=backend.front) as client:
            start = len(backend.received)
            client.set_vq_num(1, 64)
            client.set_vq_address(1, 0x1000, 0x2000, 0x3000)
            client.set_vq_state(1, SplitState(9))
            client.set_vq_kick(1, kick)
            client.set_vq_call(1, None)
            client.set_vq_ready(1, True)
            assert client.get_vq_state(1) == SplitState(9)  # and the ring is started again
            assert client.stop_vq(1) == SplitState(9)
            sent = [(x.request, x.payload, len(x.fds)) for x in backend.received[start:]]
    finally:
        os.close(kick)
    assert sent == [
        (F.SET_VRING_NUM, m.VringState(1, 64), 0),
        (F.SET_VRING_ADDR, m.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), 0),  # descriptor, used, available
        (F.SET_VRING_BASE, m.VringState(1, 9), 0),
        (F.SET_VRING_KICK, m.U64(1), 1),
        (F.SET_VRING_CALL, m.U64(1 | m.VRING_NOFD_MASK), 0),
        (F.SET_VRING_ENABLE, m.VringState(1, 1), 0),
        (F.GET_VRING_BASE, m.VringState(1, 0), 0),
        (F.SET_VRING_KICK, m.U64(1), 1),
        (F.GET_VRING_BASE, m.VringState(1, 0), 0),
    ]


def test_set_map_sends_the_region_fds_with_guest_addresses_as_user_addresses(scripted) -> None:
    backend = scripted(EXTENSION_ANSWERS, protocol_features=EXTENSION)
    with GuestMemory(1 << 16, guest_addr=0x40000, user_addr=0x7F0000000000) as memory:
        with VhostUserClient(sock=backend.front) as client:
            client.set_map(memory.table)
        (table,) = [x for x in backend.received if x.request is F.SET_MEM_TABLE]
    assert table.payload == m.MemoryTable((m.MemoryRegion(0x40000, 1 << 16, 0x40000, 0),))
    assert len(table.fds) == 1 and table.need_reply


def test_a_region_without_an_fd_cannot_be_shared(scripted) -> None:
    from vdpasim.errors import UsageError
    from vdpasim.memory import Region, RegionTable

    backend = scripted(EXTENSION_ANSWERS, protocol_features=EXTENSION)
    fd = os.memfd_create("vdpasim-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    table = RegionTable([Region.from_fd(fd, guest_addr=0, size=0x1000)])
    os.close(fd)
    try:
        with VhostUserClient(sock=backend.front) as client, pytest.raises(UsageError, match="keep_fd"):
            client.set_map(table)
    finally:
        table.close()


def test_an_error_reply_raises_with_its_errno(scripted) -> None:
    backend = scripted(
        {**EXTENSION_ANSWERS, F.VDPA_GET_DEVICE_ID: m.ErrorReply(errno.EOPNOTSUPP)}, protocol_features=EXTENSION
    )
    with VhostUserClient(sock=backend.front) as client:
        with pytest.raises(DeviceRequestError) as refused:
            client.get_device_id()
        assert refused.value.errno == errno.EOPNOTSUPP
        assert client.connected


def test_an_answer_to_another_request_drops_the_connection(scripted) -> None:
    backend = scripted(protocol_features=EXTENSION)
    backend.answers[F.VDPA_GET_VQS_COUNT] = lambda msg: backend.stream.send(Message(F.GET_STATUS, m.U64(0), reply=True))
    with pytest.raises(SessionError, match="answered VDPA_GET_VQS_COUNT with GET_STATUS"):
        VhostUserClient(sock=backend.front)


def test_a_back_end_hanging_up_is_a_transport_error_worth_a_reconnect(scripted) -> None:
    backend = scripted({**EXTENSION_ANSWERS, F.VDPA_GET_VENDOR_ID: "hang up"}, protocol_features=EXTENSION)
    with VhostUserClient(sock=backend.front) as client:
        with pytest.raises(TransportError) as lost:
            client.get_vendor_id()
        assert lost.value.reconnect and not client.connected
        with pytest.raises(TransportError, match="not connected"):
            client.get_device_id()


def test_a_silent_back_end_is_a_transport_error_after_the_timeout(scripted) -> None:
    backend = scripted({**EXTENSION_ANSWERS, F.VDPA_GET_VENDOR_ID: "silence"}, protocol_features=EXTENSION)
    with VhostUserClient(sock=backend.front, timeout=0.2) as client, pytest.raises(TransportError, match="no data"):
        client.get_vendor_id()


def test_without_protocol_features_the_client_mirrors_status_and_stops_rings_to_disable_them(scripted) -> None:
    backend = scripted(
        {
            F.GET_FEATURES: m.U64(NET_FEATURES),  # no VHOST_USER_F_PROTOCOL_FEATURES
            F.GET_VRING_BASE: lambda msg: m.VringState(msg.payload.index, 0),  # type: ignore[attr-defined]
        }
    )
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with VhostUserClient(sock=backend.front) as client:
            assert not client.has_protocol_features and client.protocol_features == 0
            client.set_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
            assert client.get_status() == c.VIRTIO_CONFIG_S_ACKNOWLEDGE
            client.set_vq_kick(0, kick)
            client.set_vq_ready(0, True)
            client.set_vq_ready(0, False)
            client.reset()
            for op in ("suspend", "resume", "set_config_cb"):
                assert not supports(client, op)
            with pytest.raises(SessionError):
                client.get_config(0, 6)
    finally:
        os.close(kick)
    assert backend.requests() == [
        F.GET_FEATURES,
        F.SET_OWNER,
        F.SET_VRING_KICK,
        F.GET_VRING_BASE,  # disabling a ring that is always enabled: stop it
        F.RESET_OWNER,
    ]
