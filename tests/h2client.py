"""A blocking HTTP/2 test client (the ``h2`` library over TLS with ALPN) that controls flow per stream.

Run it from a thread (``threads.deferToThread``) while the reactor serves.
Streams in ``stalled`` never get their flow-control window back: their
data is counted but the server is told nothing, so it must stop sending
them while the others go on (the connection's window is still returned).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame


@attrs.define
class StreamState:
    status: int | None = None
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    body: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code
    reset_by_server: bool = True


class H2Client:
    """One HTTP/2 connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, *, window: int = 65535, read_socket: bool = True) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.initiate_connection()
        if window > 65535:
            self.conn.increment_flow_control_window(2**31 - 1 - 65535)
        self.streams: dict[int, StreamState] = {}
        self.stalled: set[int] = set()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.remote_settings: dict[int, int] = {}
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, frame: Frame) -> None:
        """A frame the h2 state machine would not send (an unfinished header block...)."""
        self._flush()
        self.sock.sendall(frame.serialize())

    def get(
        self, path: str, headers: list[tuple[str, str]] = (), method: str = "GET", end_stream: bool = True
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [(":method", method), (":scheme", "https"), (":authority", "localhost"), (":path", path)]
            + list(headers),
            end_stream=end_stream,
        )
        self.streams[stream_id] = StreamState()
        self._flush()
        return stream_id

    def ping(self) -> None:
        if self.goaway is None:
            self.conn.ping(b"12345678")
            self._flush()

    def release(self, stream_id: int, amount: int) -> None:
        """Give a stalled stream ``amount`` more bytes of window (a slow reader)."""
        if self.conn.streams.get(stream_id) is not None and not self.streams[stream_id].ended:
            try:
                self.conn.increment_flow_control_window(amount, stream_id=stream_id)
            except h2.exceptions.StreamClosedError:
                return
            self._flush()

    def pump(self, timeout: float = 0.2) -> bool:
        """Read and handle what arrives within ``timeout``; False once the server closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._handle(event)
        self._flush()
        return True

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            state = self.streams[event.stream_id]
            state.headers = dict(event.headers)
            state.status = int(state.headers[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.streams[event.stream_id].body += event.data
            size = event.flow_controlled_length
            if event.stream_id in self.stalled:
                if size:
                    self.conn.increment_flow_control_window(size)  # the connection's, not the stream's
            elif size and self.conn.streams.get(event.stream_id) is not None:
                try:
                    self.conn.acknowledge_received_data(size, event.stream_id)
                except h2.exceptions.StreamClosedError:
                    self.conn.increment_flow_control_window(size)
            elif size:
                self.conn.increment_flow_control_window(size)
        elif isinstance(event, h2.events.StreamEnded):
            self.streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.streams[event.stream_id].reset = event.error_code
            self.streams[event.stream_id].reset_by_server = event.remote_reset
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value

    def until(self, predicate: Callable[[], object], timeout: float = 10.0) -> bool:
        """Pump until ``predicate()`` is true; False if ``timeout`` passes or the server closes first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or not self.pump(0.1):
                return bool(predicate())
        return True

    def done(self, stream_id: int) -> bool:
        state = self.streams[stream_id]
        return state.ended or state.reset is not None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
