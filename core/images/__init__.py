"""Image vocabulary shared by berthd and the client library: media types, descriptors and
manifests, platforms and their matching, references, Go-compatible JSON.

Pure functions and data (no I/O, no event loop library), so a server module (trio) and a
client module (asyncio) import the same definitions; :mod:`.image`'s walks await only the
reader they are given, and :mod:`.unpack` awaits only the client it is given (the client
library's over the API, or berthd's own stores in ``core.transfer``). Image work over the
API (pull, push, import, export) is the client library's: :mod:`berth.core.client.images`.
"""
