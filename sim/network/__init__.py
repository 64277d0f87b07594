"""The simulated network: hosts, links with capacity and latency, NAT boxes, and the
stream and datagram transports the virtual-time loop hands to real protocol code."""
