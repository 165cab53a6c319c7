"""Scale-out engines: an S3 store for files and a Redis/Valkey bus between nodes.

Nothing here is imported by ``import conduit``; the modules that need the
``cluster`` extra (boto3, redis) import it themselves:

* :mod:`.store`: the storage protocol file transfer uses (no extra needed);
* :mod:`.location`: ``s3://BUCKET/PREFIX`` parsing (no extra needed);
* :mod:`.s3`: :class:`~conduit.cluster.s3.S3Store` (boto3);
* :mod:`.bus`: :class:`~conduit.cluster.bus.ClusterBus` (redis);
* :mod:`._node` and :mod:`._push`: a server's part in the cluster
  (``ServerDescriptor(cluster_url=...)``, ``server.cluster``): cluster-unique
  client ids, broadcasts to every node, pushes to clients of other nodes.
"""
