"""tools_helpers.free_port: the one port allocator of the suite never hands out a port twice, across processes."""

import socket
import subprocess
import sys
import textwrap

from tools_helpers import REPO_ROOT, free_port

# Another pytest process (or another engineer's run on the same machine): claims ports and keeps
# them until told to exit, as a test server does.
HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from tools_helpers import free_port
    print(*[free_port() for _ in range(3)], flush=True)
    sys.stdin.read()
""")


def test_free_port_never_repeats_within_a_process():
    ports = [free_port() for _ in range(5)]
    assert len(set(ports)) == 5


def test_free_port_skips_ports_held_by_another_process_and_bound_ports():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO_ROOT / "tests")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        held = {int(p) for p in holder.stdout.readline().split()}
        assert len(held) == 3
        assert not held & {free_port() for _ in range(5)}  # locked by the other process
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder is gone, so its ports are the lowest unlocked ones again; bound by something that
    # knows nothing of our lock files, they are still skipped.
    busy = []
    try:
        for port in held:
            s = socket.socket()
            busy.append(s)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pass  # taken meanwhile by another test process: skipped all the same
        ours = [free_port() for _ in range(3)]
        assert not held & set(ours)
    finally:
        for s in busy:
            s.close()
    for port in ours:  # each is free to bind: what the server or launcher does next
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
