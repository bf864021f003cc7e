#!/usr/bin/env python3
"""Drives Spindle's QMP socket with QEMU's own Python client (qemu.qmp).

Usage: qmp_client.py QMP_SOCKET IMAGE_FILE
"""
import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(sock: str, image: str) -> None:
    qmp = QMPClient("spindle-test")
    await qmp.connect(sock)
    version = await qmp.execute("query-version")
    assert version["package"].startswith("spindle "), version
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "py0", "filename": image})
    out = await qmp.execute("x-debug-io", {"node-name": "py0", "command": "write -P 0x3c 0 64k"})
    assert out.startswith("wrote 65536/65536"), out
    await qmp.execute("x-debug-io", {"node-name": "py0", "command": "read -P 0x3c 0 64k"})
    nodes = await qmp.execute("query-named-block-nodes")
    assert [n["node-name"] for n in nodes] == ["py0"], nodes
    try:
        await qmp.execute("blockdev-del", {"node-name": "missing"})
        raise AssertionError("blockdev-del of a missing node succeeded")
    except ExecuteError as err:
        assert err.error_class == "DeviceNotFound", err.error_class
    with qmp.listener() as listener:
        await qmp.execute("quit")
        async for event in listener:
            if event["event"] == "SHUTDOWN":
                assert event["data"]["reason"] == "host-qmp-quit", event
                break
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the daemon closed the socket as it exited, as QEMU does after quit
    print("OK")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), timeout=60))
