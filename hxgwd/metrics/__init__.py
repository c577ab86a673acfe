"""Prometheus metrics: a sans-I/O registry (registry.py), its text exposition (exposition.py), the
gateway's own series (gateway.py: recorded from finished requests' records, in idle work) and the
gauges read at scrape time from the objects that own the state (collect.py).

Label values come only from the config or the key store (models, deployments, backends, key names,
the endpoint table's names), never from a request: a model name a client makes up creates no series.
"""
