#!/usr/bin/env python3
"""The floor under bench_store's "router CPU per instance": what the promises alone cost on this machine.

A store-and-forward with no DICOM in it, in one Python thread: receive the instance's bytes from a
socket, SHA-256 them, write them to a new file, fsync it, rename it into place, fsync the folder,
read the file back, send it on, delete it. That is what the router must do per instance before any
PDU, data set check, catalog transaction or response (Success only after fsync; forwarding from the
durable copy). The sender and the receiving end run in other threads; only the working thread's CPU
(user + system) counts, stage by stage.

    .venv/bin/python scripts/bench_floor.py            # 525 KB and 9 KB, as bench_store's large and small
    .venv/bin/python scripts/bench_floor.py --count 2000 --folder /var/lib/dicomrouter/spool
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import tempfile
import threading
import time

SIZES = {"large": 525_000, "small": 9_000}  # bench_store's instances, file meta included
STAGES = ("receive", "sha256", "write+fsync", "rename+fsync folder", "read back", "send on", "delete")


def socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return ours, theirs


def run(size: int, count: int, folder: str) -> tuple[float, dict[str, float]]:
    """(CPU seconds of the working thread per instance, per stage)."""
    incoming = os.path.join(folder, "tmp")
    objects = os.path.join(folder, "objects")
    os.makedirs(incoming, exist_ok=True)
    os.makedirs(objects, exist_ok=True)
    payload = os.urandom(size)
    sender, receiver = socket_pair()
    forward, destination = socket_pair()

    def send() -> None:  # the modality: one instance, then wait for the answer
        for _ in range(count):
            sender.sendall(payload)
            sender.recv(1)

    def drain() -> None:  # the PACS
        buffer, got = bytearray(1 << 20), 0
        while got < size * count:
            got += destination.recv_into(buffer)

    threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    spent = dict.fromkeys(STAGES, 0.0)
    buffer = bytearray(size)
    view = memoryview(buffer)
    started = time.thread_time()
    for _ in range(count):
        mark = time.thread_time()

        def stage(name: str) -> None:
            nonlocal mark
            now = time.thread_time()
            spent[name] += now - mark
            mark = now

        got = 0
        while got < size:
            got += receiver.recv_into(view[got:])
        receiver.send(b"k")
        stage("receive")
        digest = hashlib.sha256(buffer).hexdigest()
        stage("sha256")
        partial = os.path.join(incoming, f"{digest}.part")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, buffer)
        os.fsync(fd)
        os.close(fd)
        stage("write+fsync")
        final = os.path.join(objects, f"{digest}.dcm")
        os.replace(partial, final)
        fd = os.open(objects, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        stage("rename+fsync folder")
        fd = os.open(final, os.O_RDONLY)
        data = os.read(fd, size)
        os.close(fd)
        stage("read back")
        forward.sendall(data)
        stage("send on")
        os.unlink(final)
        stage("delete")
    total = time.thread_time() - started
    for thread in threads:
        thread.join(timeout=30)
    for sock in (sender, receiver, forward, destination):
        sock.close()
    return total / count, {name: seconds / count for name, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="instances per size")
    parser.add_argument("--size", choices=sorted(SIZES), action="append", help="default: both")
    parser.add_argument("--folder", help="where the files go (default: a temporary folder, as bench_store's spool)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-floor-", dir=args.folder) as folder:
        for name in args.size or ("large", "small"):
            per_instance, stages = run(SIZES[name], args.count, os.path.join(folder, name))
            print(f"{name} ({SIZES[name] // 1000} KB) x {args.count}: {per_instance * 1000:.3f} ms CPU per instance")
            print("    " + ", ".join(f"{stage} {seconds * 1000:.3f}" for stage, seconds in stages.items()))
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
