"""The NATS bus: gateways and services as peers on a NATS cluster (``wsbus[nats]``)."""
