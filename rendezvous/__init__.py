"""The rendezvous server of one mail domain: protocol, server, store, client."""
