"""Flood a router: 10 x max_associations at once plus idle connections, then many connect cycles.

    .venv/bin/python scripts/flood.py [--max-associations 64] [--cycles 10000]

Starts its own `dicomrouter serve` (no PACS needed) and prints the router's threads, open files
and resident memory before, after the flood and after the cycles.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.front.test_echo_scp import write_router_config  # noqa: E402
from tests.front.test_front_pdus import crashes_in_log, echo_succeeds  # noqa: E402
from tests.support.flood import connect_cycles, flood, wait_for_figures  # noqa: E402
from tests.support.raw_peer import RawPeer, process_figures  # noqa: E402
from tests.support.router_process import RouterProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-associations", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=10000)
    parser.add_argument("--acse-timeout", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path, port = write_router_config(
            Path(folder), router={"max_associations": args.max_associations, "acse_timeout": args.acse_timeout}
        )
        router = RouterProcess(path, port).start()
        try:
            assert echo_succeeds(port)
            pid = router.process.pid
            before = process_figures(pid)
            print(f"before: {before}")
            idle = [RawPeer(port) for _ in range(args.max_associations)]
            started = time.monotonic()
            result = flood(port, 10 * args.max_associations)
            print(f"flood of {result.attempts} in {time.monotonic() - started:.1f} s: {result.established} accepted, "
                  f"{result.rejected_local_limit} rejected (local limit exceeded), {len(result.other)} other "
                  f"({set(result.other)}); {result.echo_count} echoes on an open association during it, slowest "
                  f"{result.echo_max_s:.3f} s, {result.echo_failures} failed")
            closed = [peer.wait_closed(args.acse_timeout + 10) for peer in idle]
            print(f"idle connections dropped: {sum(c.closed for c in closed)} of {len(idle)}, "
                  f"after at most {max(c.seconds for c in closed):.1f} s more")
            for peer in idle:
                peer.close()
            print(f"after the flood: {wait_for_figures(pid, before['threads'], before['open_fds'], 30)}")
            started = time.monotonic()
            done = connect_cycles(port, args.cycles)
            elapsed = time.monotonic() - started
            print(f"{done} of {args.cycles} connect/disconnect cycles in {elapsed:.1f} s ({args.cycles / elapsed:.0f}/s)")
            print(f"after the cycles: {wait_for_figures(pid, before['threads'], before['open_fds'], 30)}")
            print(f"echo afterwards: {echo_succeeds(port)}; crashes in the log: {len(crashes_in_log(router))}; "
                  f"router alive: {router.process.poll() is None}")
        finally:
            router.stop()


if __name__ == "__main__":
    main()
