"""The network service: what the daemons are made of, above the method core.

``store`` (content-addressed packages and blobs), ``node`` (accept, verify,
repair, predict, independent of gRPC), ``repair``, ``servicer`` (the gRPC
services), ``interceptors`` (errors -> statuses, tokens), ``server`` (assembly),
``channel`` (limits both ends share), ``client`` (the torch-free edge client),
``retry``, ``daemon`` (logs, metrics, config layering, signals), ``wiremeter``.
"""
