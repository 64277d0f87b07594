"""The two failures every layer above can see from this package."""


class CryptoError(Exception):
    """Base class of everything this package raises on bad input."""


class DecodeError(CryptoError, ValueError):
    """Bytes or a decoded structure do not have the expected shape (types, sizes, ranges)."""


class VerificationError(CryptoError):
    """A signature, MAC, proof or hash did not match: the data was forged or corrupted."""
