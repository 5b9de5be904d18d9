"""The Flower app of the pilot: one ClientApp per hospital, one ServerApp that aggregates.

- `protocol`: the record keys and how training settings travel in messages.
- `client_app`: a hospital's side; reaches its data only through `fl.data`.
- `server_app`: the aggregator's side; never reads site data.
- `ledger`: the record of every message that crosses a site boundary.
- `engine`: runs the same apps in one process (the default) or in Flower's Ray simulation.
- `secagg`: the same FedAvg rounds under Flower's SecAgg+ (legacy API), and what the server receives.
"""
