#!/usr/bin/env python3
"""Runs one mirror, one commit and one stream on Spindle with QEMU's own
Python client (qemu.qmp), waiting on events the way QEMU's iotests do.

Usage: qmp_jobs.py QMP_SOCKET DIR
DIR holds src.qcow2, tgt.qcow2 (mirror) and base/mid/top.qcow2 (a chain).
"""
import asyncio
import os
import sys

from qemu.qmp import ExecuteError, QMPClient


async def wait_event(listener, name, job):
    """Returns the statuses seen for `job` until event `name` for it."""
    seen = []
    async for event in listener:
        data = event.get("data", {})
        if event["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job:
            seen.append(data["status"])
        if event["event"] == name and (data.get("device") == job or data.get("id") == job):
            return event, seen
    raise AssertionError(f"no {name} for {job}")


def qcow2(d, name, **extra):
    opts = {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": os.path.join(d, name + ".qcow2")}}
    opts.update(extra)
    return opts


async def main(sock: str, d: str) -> None:
    qmp = QMPClient("spindle-jobs")
    await qmp.connect(sock)
    for opts in (qcow2(d, "src"), qcow2(d, "tgt"), qcow2(d, "base", **{"read-only": True}),
                 qcow2(d, "mid", backing="base", **{"read-only": True}), qcow2(d, "top", backing="mid")):
        if opts.get("read-only"):
            opts["file"]["read-only"] = True
        await qmp.execute("blockdev-add", opts)

    # Mirror: READY, then job-complete.
    with qmp.listener() as listener:
        await qmp.execute("blockdev-mirror", {"job-id": "pm", "device": "src", "target": "tgt", "sync": "full"})
        ready, seen = await wait_event(listener, "BLOCK_JOB_READY", "pm")
        assert seen == ["created", "running", "ready"], seen
        assert ready["data"]["type"] == "mirror" and ready["data"]["len"] == ready["data"]["offset"], ready
        jobs = await qmp.execute("query-block-jobs")
        assert jobs[0]["device"] == "pm" and jobs[0]["ready"] is True, jobs
        await qmp.execute("job-complete", {"id": "pm"})
        done, seen = await wait_event(listener, "BLOCK_JOB_COMPLETED", "pm")
        assert "error" not in done["data"], done
        assert seen == ["waiting", "pending"], seen

    # Intermediate commit of mid into base.
    with qmp.listener() as listener:
        await qmp.execute("block-commit", {"job-id": "pc", "device": "top", "top-node": "mid", "base-node": "base"})
        done, seen = await wait_event(listener, "BLOCK_JOB_COMPLETED", "pc")
        assert done["data"]["type"] == "commit" and "error" not in done["data"], done
        assert seen == ["created", "running", "waiting", "pending"], seen

    # Stream the rest into top; then a bad request gets QEMU's error class.
    with qmp.listener() as listener:
        await qmp.execute("block-stream", {"job-id": "ps", "device": "top"})
        done, _ = await wait_event(listener, "BLOCK_JOB_COMPLETED", "ps")
        assert done["data"]["type"] == "stream" and "error" not in done["data"], done
    try:
        await qmp.execute("block-job-cancel", {"device": "ps"})
        raise AssertionError("cancelling a finished job succeeded")
    except ExecuteError as err:
        assert err.error_class == "DeviceNotActive", err.error_class
    assert await qmp.execute("query-jobs") == []
    await qmp.disconnect()
    print("OK")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), timeout=120))
