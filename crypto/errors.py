"""The failures every layer above can see from this package, and the two kinds of protocol
error every wire protocol of the project raises.

- `LocalProtocolError`: our own code misused a protocol object (a bug here). Raised.
- `RemoteProtocolError`: a peer sent something invalid. Caught at the protocol's single
  receive point and turned into an error reply, a dropped datagram or a ban, plus a
  counter; it never crashes the process.
Each protocol (rendezvous, transfer, DHT) subclasses both, so a handler can catch one
protocol's errors or, through `ProtocolError`, any of them. The split follows h11.
"""


class CryptoError(Exception):
    """Base class of everything this package raises on bad input."""


class DecodeError(CryptoError, ValueError):
    """Bytes or a decoded structure do not have the expected shape (types, sizes, ranges)."""


class VerificationError(CryptoError):
    """A signature, MAC, proof or hash did not match: the data was forged or corrupted."""


class ProtocolError(Exception):
    """Base of every protocol error in the project."""


class LocalProtocolError(ProtocolError):
    """We used a protocol object wrongly (a verb in the wrong state, a bad argument)."""


class RemoteProtocolError(ProtocolError):
    """A peer violated a protocol."""
