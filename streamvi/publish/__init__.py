"""Publishers: consumers of snapshots only (MTZ files, ZeroMQ PUB, the status page,
``/metrics``); they never import the service or reach into the trainer or store
(docs/architecture.md)."""
