"""The peer node: content store, transfer protocol, scheduler, transports, DHT, inbox, CLI."""
