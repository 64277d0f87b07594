"""Virtual-time event loop and simulated network running the real node and server code.

Start with `Simulation` (sim.simulation); the pieces are `SimLoop` (sim.loop), `Network` and
`Host` (sim.net, sim.host), the NAT model (sim.nat), latency models (sim.latency), churn
(sim.churn), the trace (sim.trace), scenarios (sim.scenario, sim.scenarios) and the
`peerpost-sim` command (sim.cli).
"""

from sim.host import Host, NoHostError, current_host
from sim.loop import SimDeadlock, SimLoop
from sim.nat import Filtering, Mapping, NatBehaviour, NatBox, webrtc_possible
from sim.simulation import Simulation

__all__ = ["Filtering", "Host", "Mapping", "NatBehaviour", "NatBox", "NoHostError",
           "SimDeadlock", "SimLoop", "Simulation", "current_host", "webrtc_possible"]
