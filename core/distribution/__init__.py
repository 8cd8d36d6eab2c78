"""OCI distribution, shared by both sides: the registry client on httpx (which runs on
asyncio and on trio, through anyio), its authentication, containerd's hosts.toml rules,
and the framework-neutral steps of a pull (they only await the client they are given).
The client library (``core.client``, asyncio) and berthd's server-side pulls
(``core.transfer``, trio) both build on it; it imports neither of them."""
