"""spinbroker's benchmark harness (issue 5): `python -m bench`, see bench/README.md.

Rooms: servers (start/stop the brokers), clients (raw asyncio clients, one per protocol),
workloads (what client processes run), scenarios (harness side of each scenario),
report (figures, tables, ratios, targets), runner (command line).
"""
