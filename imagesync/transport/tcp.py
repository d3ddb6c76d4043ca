"""The TCP socket under an SSH connection (:class:`QuickAckSocket`)."""

from __future__ import annotations

import socket


class QuickAckSocket:
    """A TCP socket for paramiko that acknowledges what it receives at once.

    Both ends of an SSH command exchange send small packets. With Nagle's
    algorithm on our side (paramiko never turns it off), a request waits for
    the ACK of the previous one; on sshd's side (OpenSSH turns it off for
    interactive sessions only), an answer waits for our ACK of its previous
    packet, which Linux delays by 40 ms when we have nothing to send. Each stall
    cost 40 ms: a connection took ~140 ms to run its first command and each
    later command ~48 ms, against ~35 ms and ~9 ms without them
    (bench/README.md). So TCP_NODELAY is set, and TCP_QUICKACK after every
    read (Linux clears it by itself).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._quickack = getattr(socket, "TCP_QUICKACK", None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # a socket that cannot take it still works, only slower
            pass

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        if self._quickack is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, self._quickack, 1)
            except OSError:
                self._quickack = None
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)
