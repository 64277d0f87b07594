"""Virtual-time event loop and simulated network running the real node and server code.

Start with `Simulation` (sim.simulation); the pieces are `SimLoop` (sim.loop), `Network`
and `Host` (sim.network.net, sim.network.host), the NAT model (sim.network.nat), latency
models (sim.network.latency), churn (sim.churn), the trace (sim.trace), scenarios
(sim.scenario, sim.scenarios), plots (sim.plots) and the `peerpost-sim` command (sim.cli).
The project's own code runs on it unchanged: `sim.deploy` puts the real rendezvous server
(in-memory inline SQLite store) and real `Node` daemons on simulated hosts, and
`sim.webrtc.SimWebRtcEndpoint` is a WebRTC transport with `WebRtcEndpoint`'s dial/accept
shape whose channel opens as the NAT model and the measured setup cost say. The TCP punch
rung is the real `overlay.transports.punch` over simulated sockets (sim.network.sockets):
the server's STUN over TCP, the NATs' TCP mapping and filtering and a simultaneous open.
The QUIC rung is the real `overlay.transports.quic` and qh3 over simulated UDP ports
(`loop_udp`): STUN on UDP, the probes through the NATs' UDP mapping and filtering, the
handshake, congestion control and timers in virtual time. The server's STUN on UDP also
answers each node's start-up reachability probe, so a NATed node knows it is one, as on a
real network.
"""

from sim.loop import SimDeadlock, SimLoop
from sim.network.host import Host, NoHostError, current_host
from sim.network.nat import Filtering, Mapping, NatBehaviour, NatBox, webrtc_possible
from sim.simulation import Simulation

__all__ = ["Filtering", "Host", "Mapping", "NatBehaviour", "NatBox", "NoHostError",
           "SimDeadlock", "SimLoop", "Simulation", "current_host", "webrtc_possible"]
