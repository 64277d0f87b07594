"""Identities, signatures, sealed envelopes, content sealing and Merkle trees.

Pure functions and small value types: no I/O, no asyncio, no clock reads.
"""
