"""The Redis metadata store: instance registry, global prefix index and chunk index.
Metadata only — never tensors.

Keys (``prefix`` defaults to ``pdserve``)::

    {prefix}:inst:{instance_id}   hash {role, epoch, ts}; TTL ``ttl_s``, refreshed by heartbeats
    {prefix}:blk:{block_hash}     set of instance ids holding that block; TTL ``block_ttl_s``
    {prefix}:chunk:{chunk_hash}   set of instance ids holding that RAG chunk's KV (any tier of
                                  its chunk store, ``workers/chunk_cache.py``); same TTL

Staleness (LESSONS #7): an instance that dies stops heart-beating, its registry key expires,
and every lookup ignores its index entries from then on (the Lua script checks the registry),
so the router never trusts a dead instance's cache; the block sets themselves expire later.
A restarted Redis loses everything: publishers notice (the server's run id changes, or the
registry key is gone) and republish their whole cache.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import redis

log = logging.getLogger(__name__)

# KEYS: block keys in chain order. ARGV[1]: registry key prefix.
# Returns a flat list [instance, leading_blocks, ...] for live instances with >= 1 block.
_LONGEST_PREFIX = """
local alive = nil
local result = {}
for i, k in ipairs(KEYS) do
  local nxt = {}
  local any = false
  for _, m in ipairs(redis.call('SMEMBERS', k)) do
    if alive == nil or alive[m] then nxt[m] = true; any = true end
  end
  if alive ~= nil then
    for m, _ in pairs(alive) do if not nxt[m] then result[m] = i - 1 end end
  end
  alive = nxt
  if not any then break end
end
if alive ~= nil then for m, _ in pairs(alive) do result[m] = #KEYS end end
local out = {}
for m, n in pairs(result) do
  if n > 0 and redis.call('EXISTS', ARGV[1] .. m) == 1 then
    table.insert(out, m); table.insert(out, n)
  end
end
return out
"""


# KEYS: chunk keys. ARGV[1]: registry key prefix.
# Returns a flat list [instance, chunk_index, ...] (1-based indices into KEYS), live only.
_CHUNK_HOLDERS = """
local live = {}
local out = {}
for i, k in ipairs(KEYS) do
  for _, m in ipairs(redis.call('SMEMBERS', k)) do
    if live[m] == nil then live[m] = redis.call('EXISTS', ARGV[1] .. m) == 1 end
    if live[m] then table.insert(out, m); table.insert(out, i) end
  end
end
return out
"""


class MetadataStore:
    """Thin, synchronous access to the keys above (call from threads, not the event loop)."""

    def __init__(self, url: str, prefix: str = "pdserve", ttl_s: float = 3.0,
                 block_ttl_s: float = 600.0, timeout_s: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.block_ttl_s = block_ttl_s
        self.r = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s)
        self._script = self.r.register_script(_LONGEST_PREFIX)
        self._chunk_script = self.r.register_script(_CHUNK_HOLDERS)

    def _inst(self, instance_id: str) -> str:
        return f"{self.prefix}:inst:{instance_id}"

    def _blk(self, h: int) -> str:
        return f"{self.prefix}:blk:{h}"

    def run_id(self) -> str:
        return str(self.r.info("server")["run_id"])

    def heartbeat(self, instance_id: str, role: str, epoch: int) -> bool:
        """Refresh the registry entry; returns False if it had expired or was missing."""
        key = self._inst(instance_id)
        p = self.r.pipeline()
        p.exists(key)
        p.hset(key, mapping={"role": role, "epoch": epoch, "ts": time.time()})
        p.pexpire(key, int(self.ttl_s * 1000))
        existed = p.execute()[0]
        return bool(existed)

    def unregister(self, instance_id: str) -> None:
        self.r.delete(self._inst(instance_id))

    def live_instances(self, role: str | None = None) -> dict[str, dict]:
        out = {}
        for key in self.r.scan_iter(match=f"{self.prefix}:inst:*", count=256):
            d = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
            if d and (role is None or d.get("role") == role):
                out[key.decode().rsplit(":", 1)[1]] = d
        return out

    def publish(self, instance_id: str, added: Sequence[int], removed: Sequence[int]) -> None:
        """One pipelined round trip for a batch of index changes."""
        if not added and not removed:
            return
        p = self.r.pipeline(transaction=False)
        ttl = int(self.block_ttl_s * 1000)
        for h in added:
            p.sadd(self._blk(h), instance_id)
            p.pexpire(self._blk(h), ttl)
        for h in removed:
            p.srem(self._blk(h), instance_id)
        p.execute()

    def longest_prefix(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per live instance, how many leading blocks of ``hashes`` it holds (one round trip)."""
        if not hashes:
            return {}
        flat = self._script(keys=[self._blk(h) for h in hashes], args=[f"{self.prefix}:inst:"])
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    # ---- chunk index (RAG chunk caches) -------------------------------------------------
    def _chunk(self, h: int) -> str:
        return f"{self.prefix}:chunk:{h}"

    def publish_chunks(self, instance_id: str, added: Sequence[int],
                       removed: Sequence[int]) -> None:
        """One pipelined round trip for a batch of chunk-store changes."""
        if not added and not removed:
            return
        p = self.r.pipeline(transaction=False)
        ttl = int(self.block_ttl_s * 1000)
        for h in added:
            p.sadd(self._chunk(h), instance_id)
            p.pexpire(self._chunk(h), ttl)
        for h in removed:
            p.srem(self._chunk(h), instance_id)
        p.execute()

    def chunk_holders(self, hashes: Sequence[int]) -> dict[str, list[int]]:
        """Per live instance, the indices of the ``hashes`` whose chunk KV it holds (one round
        trip; instances whose registry entry expired are left out)."""
        if not hashes:
            return {}
        flat = self._chunk_script(keys=[self._chunk(h) for h in hashes],
                                  args=[f"{self.prefix}:inst:"])
        out: dict[str, list[int]] = {}
        for i in range(0, len(flat), 2):
            out.setdefault(flat[i].decode(), []).append(int(flat[i + 1]) - 1)
        return out


class IndexPublisher:
    """Runs in an instance: batches its block manager's cache events into Redis, heartbeats
    its registry entry, and republishes everything after Redis comes back empty.

    Serializable until ``start`` (it is built by ``build_app`` and passed to the replicas).
    ``snapshot()`` (given to ``start``) returns every hash the instance holds right now.
    """

    def __init__(self, url: str, flush_s: float = 0.1, heartbeat_s: float = 1.0) -> None:
        self.url = url
        self.flush_s = flush_s
        self.heartbeat_s = heartbeat_s
        self.healthy = False
        self.errors = 0

    def start(self, instance_id: str, role: str, epoch: int,
              snapshot: Callable[[], list[int]],
              chunk_snapshot: Callable[[], list[int]] | None = None) -> IndexPublisher:
        """Returns a started copy; ``self`` stays a plain, picklable description (Serve
        re-pickles a replica's constructor arguments after the constructor ran).
        ``chunk_snapshot()``: every chunk hash the instance's chunk store holds."""
        run = copy.copy(self)
        run.chunk_snapshot = chunk_snapshot
        run._run(instance_id, role, epoch, snapshot)
        return run

    def _run(self, instance_id: str, role: str, epoch: int,
             snapshot: Callable[[], list[int]]) -> None:
        self.store = MetadataStore(self.url)
        self.instance_id, self.role, self.epoch = instance_id, role, epoch
        self.snapshot = snapshot
        self._chunk_events: deque[tuple[bool, list[int]]] = deque()
        self._events: deque[tuple[bool, list[int]]] = deque()
        self._stop = threading.Event()
        self._run_id: str | None = None
        self._thread = threading.Thread(target=self._loop, name="pdserve-index", daemon=True)
        self._thread.start()

    # block-manager callbacks (engine thread): O(1), never touch the network
    def cached(self, hashes: list[int]) -> None:
        self._events.append((True, hashes))

    def evicted(self, hashes: list[int]) -> None:
        self._events.append((False, hashes))

    # chunk-store callbacks (engine thread), the same way
    def chunk_cached(self, hashes: list[int]) -> None:
        self._chunk_events.append((True, hashes))

    def chunk_evicted(self, hashes: list[int]) -> None:
        self._chunk_events.append((False, hashes))

    def _loop(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(self.flush_s):
            try:
                if time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + self.heartbeat_s
                self._flush()
                if not self.healthy:
                    log.warning("Redis at %s is reachable again", self.url)
                self.healthy = True
            except redis.RedisError as e:
                if self.healthy or self.errors == 0:
                    log.warning("Redis at %s unavailable (%s); routing falls back to load only",
                                self.url, e)
                self.healthy = False
                self.errors += 1
                self._run_id = None  # force a full republish once it is back
                next_beat = 0.0

    def _beat(self) -> None:
        existed = self.store.heartbeat(self.instance_id, self.role, self.epoch)
        rid = self.store.run_id()
        if rid != self._run_id or not existed:
            # New or restarted Redis (or our entry expired): the index lost our blocks.
            self._events.clear()
            self.store.publish(self.instance_id, self.snapshot(), [])
            if self.chunk_snapshot is not None:
                self._chunk_events.clear()
                self.store.publish_chunks(self.instance_id, self.chunk_snapshot(), [])
            self._run_id = rid

    def _flush(self) -> None:
        added: list[int] = []
        removed: list[int] = []
        while self._events:
            add, hs = self._events.popleft()
            (added if add else removed).extend(hs)
        self.store.publish(self.instance_id, added, removed)
        added, removed = [], []
        while self._chunk_events:
            add, hs = self._chunk_events.popleft()
            (added if add else removed).extend(hs)
        self.store.publish_chunks(self.instance_id, added, removed)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.store.unregister(self.instance_id)
        except redis.RedisError:
            pass
