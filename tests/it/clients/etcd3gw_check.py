"""etcd3gw (Debian's python3-etcd3gw), a client of etcd's JSON gateway, against a member:
status, members, put/get/create/replace, prefixes, leases, locks, a watch, deletes.
Usage: etcd3gw_check.py HOST PORT. Prints "etcd3gw ok"; an assertion fails otherwise."""
import sys
from etcd3gw.client import Etcd3Client
host, port = sys.argv[1], int(sys.argv[2])
c = Etcd3Client(host=host, port=port, api_path="/v3/", timeout=10)
assert c.status()["version"].startswith("3."), c.status()
assert len(c.members()) >= 1
assert c.put("foo", "bar")
assert c.get("foo") == [b"bar"] or c.get("foo") == ["bar"], c.get("foo")
assert c.create("new", "1") is True
assert c.create("new", "2") is False
assert c.replace("new", "1", "3") is True
assert c.replace("new", "1", "4") is False
c.put("dir/a", "1"); c.put("dir/b", "2")
assert len(c.get_prefix("dir/")) == 2
lease = c.lease(ttl=30)
assert 0 < lease.ttl() <= 30
assert c.put("leased", "v", lease=lease)
assert [k for k in lease.keys()] == [b"leased"], lease.keys()
assert lease.refresh() > 0
assert lease.revoke()
assert c.get("leased") == []
lock = c.lock(ttl=10)
assert lock.acquire()
assert lock.is_acquired()
assert lock.release()
# A watch from the revision of a put made before it sees that put.
revision = int(c.status()["header"]["revision"])
c.put("w", "x")
event = c.watch_once("w", timeout=10, start_revision=revision + 1)
assert event["kv"]["value"] in (b"x", "x"), event
assert c.delete_prefix("dir/")
assert c.delete("foo")
assert c.get("foo") == []
print("etcd3gw ok")
