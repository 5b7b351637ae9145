"""``python -m bench soak``: many faults at once, for a long time, through one cacheport.

Load (redis-py GET/SET from a few bytes to 1 MB, pipelines, pub/sub, a RedisCluster
client on a real 3-master cluster, pymemcache, idle connections, slow readers) runs
through cacheport while a seeded schedule injects faults; at the end every
acknowledged write is read back, errors are matched to fault windows, and cacheport's
descriptors, RSS, log and /metrics are checked. See bench/README.md ("Soak").

Modules: ``schedule`` (pure, seeded), ``ledger`` (acknowledged writes and errors),
``rig`` (the processes), ``load`` (the clients), ``faults``, ``report``, ``run``.
"""
