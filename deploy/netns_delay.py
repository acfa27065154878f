"""A slow point-to-point link between two namespace hosts, for kernels without ``sch_netem``.

``tc netem`` is the tool for delay, but some kernels (this CI's VM among them) ship without the
module. This builds the same thing in user space: a TUN device in each namespace, joined by a
relay process per side that forwards every packet to the other side and writes it out there
``delay_ms`` after it left the sender, one FIFO per direction. The rate is a serialising link,
as netem's: a packet departs once the previous one has (``len * 8 / rate`` seconds each), and
arrives ``delay_ms`` after departing; the queue in front is unbounded (no loss). Only traffic
to the link's own addresses takes it:

    host a: pdtun 10.R.S.1 ── relay ══ unix socket ══ relay ── pdtun 10.R.S.2 :host b

The TUN MTU is 64 KB, so a 1 Gbit/s stream is ~2k packets/s per direction, which a Python
relay keeps up with. Both relays run inside their namespaces and share the machine's
monotonic clock, so "due time" needs no synchronisation.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

DEV = "pdtun"
MTU = 65000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_HDR = struct.Struct("!dI")  # due time (monotonic s), payload length


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = s.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def rate_bps(rate: str | None) -> float:
    """'1gbit', '100mbit', '500kbit', '1e9' -> bits per second (None: unlimited)."""
    if not rate:
        return 0.0
    r = rate.strip().lower()
    for unit, m in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if r.endswith(unit):
            return float(r[: -len(unit)]) * m
    return float(r)


def relay(sock_path: str, listen: bool, delay_s: float, bps: float) -> None:
    """One side's relay (runs inside its namespace): tun -> socket stamped with its arrival
    time at the far end; socket -> tun once that time has come. Exits when the other side
    goes away."""
    fd = _open_tun(DEV)
    if listen:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sock_path)
        srv.listen(1)
        print("listening", flush=True)
        s, _ = srv.accept()
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)

    def outbound() -> None:
        depart = 0.0  # when the previous packet has left (the link is busy until then)
        try:
            while True:
                pkt = os.read(fd, MTU + 64)
                depart = max(time.monotonic(), depart) + (len(pkt) * 8 / bps if bps else 0.0)
                s.sendall(_HDR.pack(depart + delay_s, len(pkt)) + pkt)
        except OSError:
            os._exit(0)

    threading.Thread(target=outbound, daemon=True).start()
    try:
        while True:
            due, n = _HDR.unpack(_recv_exact(s, _HDR.size))
            pkt = _recv_exact(s, n)
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            os.write(fd, pkt)
    except (EOFError, OSError):
        os._exit(0)


class DelayLine:
    """The link between ``a`` and ``b`` of a ``NetnsCluster``; ``addr_a``/``addr_b`` are the
    addresses that route over it (the hosts' bridge addresses keep the fast path)."""

    def __init__(self, cluster, a, b, delay_ms: float, rate: str | None = None) -> None:
        self.c, self.a, self.b = cluster, a, b
        base = cluster.subnet.split(".")
        net = f"10.{base[1]}.{(int(base[2]) + 128) % 256}"
        self.addr_a, self.addr_b = f"{net}.1", f"{net}.2"
        self.delay_s = delay_ms / 1000
        self.rate = rate
        self.sock = str(Path(cluster.dir) / "delay.sock")
        self.procs = []

    def start(self) -> DelayLine:
        from netns import _run

        for h, me, peer in ((self.a, self.addr_a, self.addr_b), (self.b, self.addr_b, self.addr_a)):
            _run("ip", "tuntap", "add", "dev", DEV, "mode", "tun", ns=h.ns)
            _run("ip", "link", "set", DEV, "mtu", str(MTU), "up", ns=h.ns)
            _run("ip", "addr", "add", me, "peer", peer, "dev", DEV, ns=h.ns)
        import subprocess

        cmd = [sys.executable, __file__, self.sock, str(self.delay_s), str(rate_bps(self.rate))]
        first = self.c.exec(self.a, [*cmd, "listen"], stdout=subprocess.PIPE, text=True)
        first.stdout.readline()  # listening
        self.procs = [first, self.c.exec(self.b, [*cmd, "connect"])]
        return self

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


if __name__ == "__main__":
    relay(sys.argv[1], sys.argv[4] == "listen", float(sys.argv[2]), float(sys.argv[3]))
