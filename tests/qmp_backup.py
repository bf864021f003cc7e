#!/usr/bin/env python3
"""A full and an incremental backup on Spindle with QEMU's own Python
client (qemu.qmp), as backup tools drive qemu-storage-daemon: one
transaction for the bitmap and the full backup, then an incremental.

Usage: qmp_backup.py QMP_SOCKET DIR
DIR holds disk.qcow2, full.qcow2 and inc.qcow2 (backed by full.qcow2).
"""
import asyncio
import os
import sys

from qemu.qmp import ExecuteError, QMPClient


async def wait_end(listener, job):
    """The statuses seen for `job` and its BLOCK_JOB_COMPLETED event."""
    seen = []
    async for event in listener:
        data = event.get("data", {})
        if event["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job:
            seen.append(data["status"])
        if event["event"] == "BLOCK_JOB_COMPLETED" and data.get("device") == job:
            return event, seen
    raise AssertionError(f"no end for {job}")


def qcow2(d, name, **extra):
    opts = {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": os.path.join(d, name + ".qcow2")}}
    opts.update(extra)
    return opts


async def bitmap_count(qmp, node, name):
    for n in await qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return next(b["count"] for b in n["dirty-bitmaps"] if b["name"] == name)
    raise AssertionError(f"no node {node}")


async def main(sock: str, d: str) -> None:
    qmp = QMPClient("spindle-backup")
    await qmp.connect(sock)
    for opts in (qcow2(d, "disk"), qcow2(d, "full"), qcow2(d, "inc", backing=None)):
        await qmp.execute("blockdev-add", opts)

    with qmp.listener() as listener:
        await qmp.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "nightly"}},
            {"type": "blockdev-backup", "data": {"job-id": "full", "device": "disk", "target": "full",
                                                 "sync": "full"}}]})
        done, seen = await wait_end(listener, "full")
        assert "error" not in done["data"] and done["data"]["type"] == "backup", done
        assert seen == ["created", "running", "waiting", "pending"], seen

    await qmp.execute("x-debug-io", {"node-name": "disk", "command": "write -P 0x22 1M 64k"})
    assert await bitmap_count(qmp, "disk", "nightly") == 65536

    # Grouped completion takes backups only.
    try:
        await qmp.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "disk", "name": "nightly"}}],
            "properties": {"completion-mode": "grouped"}})
        raise AssertionError("a grouped bitmap action was accepted")
    except ExecuteError as err:
        assert err.error_class == "GenericError", err.error_class

    with qmp.listener() as listener:
        await qmp.execute("blockdev-backup", {"job-id": "inc", "device": "disk", "target": "inc",
                                              "sync": "incremental", "bitmap": "nightly"})
        done, _ = await wait_end(listener, "inc")
        assert "error" not in done["data"] and done["data"]["len"] == 65536, done
    assert await bitmap_count(qmp, "disk", "nightly") == 0
    for node in ("inc", "full"):
        await qmp.execute("blockdev-del", {"node-name": node})
    await qmp.disconnect()
    print("OK")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), timeout=120))
