"""The control worker keeps room for runs: backups never take all its processes.

On the real cluster (Redis, the control and node workers, the registry behind
its proxy, a backup registry): two runs' backups are held under way (the proxy
holds their downloads from upstream), and a third run still starts at once; a
backup record whose worker died is ended by ``finalize`` past its deadline.
"""

from __future__ import annotations

import pytest
from celery import Celery
from helpers import started_run, wait_for

from imagesync import keys
from imagesync.backupstore import BackupStore
from imagesync.celeryconfig import CONTROL_QUEUE
from imagesync.redisvalues import server_time

pytestmark = pytest.mark.cluster


def test_backups_leave_the_control_worker_free_for_runs_and_finalize_ends_an_overdue_one(deploy, tmp_path):
    from testcluster.registry import Registry

    d = deploy(nodes=2)
    c = d.cluster
    with Registry(tmp_path / "backup-registry") as backup:
        d.configure(transfer=False, backup={"registry": f"{backup.address}/bk", "insecure": True,
                                            "insecure_sources": [c.registry_address]})
        d.start()
        c.seed({"node-1": ["bcm11/big:1"], "node-2": ["bcm11/big:1"]})
        c.proxy.hold(match="/bcm11/big/")  # every backup copies big:1 from upstream, and waits
        try:
            first, second = (started_run(d.cli("sync")) for _ in range(2))
            log = lambda: d.services.log("control")  # noqa: E731
            # both runs' backups have reached the control worker, the first one's download is held
            wait_for(lambda: log().count("Task imagesync.backup[") >= 2 and c.proxy.held, 60,
                     "both backups received, the first one under way")
            with c.redis.client() as client:
                # a run sent now is taken by the control worker at once
                task = Celery(broker=c.redis.url).send_task(
                    "imagesync.sync", kwargs={"trigger": "manual"}, queue=CONTROL_QUEUE)
                wait_for(lambda: client.exists(keys.sync_taken(task.id)), 30,
                         "the control worker to take a run while backups are under way")
                # one backup holds a process; the other waits in the queue, holding none
                assert len(client.zrange(keys.BACKUPS_RUNNING, 0, -1)) == 1
                assert f"run {second}: another backup is under way" in log()
        finally:
            c.proxy.release()
        for run_id in (first, second):
            wait_for(lambda run_id=run_id: (d.history(run_id).get("backup") or {}).get("status") == "done",
                     120, f"the backup of run {run_id}")
        assert backup.manifest_digest(f"bk/{c.registry_address.replace(':', '_')}/bcm11/big", "1") == \
            c.digests[c.ref("bcm11/big:1")]

        # a backup whose worker died keeps its record running only until its deadline:
        # beat's finalize, run by the control worker, ends it
        with c.redis.client() as client:
            store = BackupStore(client)
            dead = "20261204-000000-dead00"
            client.lpush(keys.HISTORY, dead)
            store.remember(dead, {c.ref("bcm11/big:1"): {}})
            assert store.start(dead, [c.ref("bcm11/big:1")], 0, 60, now=server_time(client) - 120)
            Celery(broker=c.redis.url).send_task("imagesync.finalize", queue=CONTROL_QUEUE)
            # read raw: a reader of the record (store.get) would end it itself
            wait_for(lambda: client.hget(keys.run_backup(dead), "status") == b"abandoned", 30,
                     "finalize to end the overdue backup")
            wait_for(lambda: f"run {dead}: backup abandoned: no outcome by its deadline" in d.services.log("control"),
                     30, "the abandoned backup's summary in the control worker's log")
