"""Image metadata through the Images API and the real ctr, berthd against containerd.

ctr 1.6 cannot create an image without pulling one, so images are created with a
grpclib client; listing, labelling and removal go through ctr as well.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import betterproto
import pytest
from betterproto.lib.google.protobuf import Empty, FieldMask
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError

from berth.core.api.containerd.events import ContentDelete
from berth.core.api.containerd.services.content import v1 as capi
from berth.core.api.containerd.services.events import v1 as eapi
from berth.core.api.containerd.services.images import v1 as iapi
from berth.core.api.containerd.types import Descriptor
from berth.core.content import digest as dg
from tests import daemons

pytestmark = [pytest.mark.interop]

NS = "imgtest"
IMAGES = "/containerd.services.images.v1.Images/"
CONTENT = "/containerd.services.content.v1.Content/"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
D1, D2 = dg.from_string("manifest one"), dg.from_string("index two")
HANG_GUARD = 20.0


def ctr(d: daemons.Daemon, *args: str, ns: str = NS) -> subprocess.CompletedProcess[str]:
    argv = [daemons.CTR, "--address", str(d.address), "--namespace", ns, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def grpc(d: daemons.Daemon, fn: Callable[[Channel], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        channel = Channel(path=str(d.address))
        try:
            return await fn(channel)
        finally:
            channel.close()

    return asyncio.run(run())


def md(ns: str | None = NS) -> dict[str, str]:
    return {"containerd-namespace": ns} if ns else {}


async def call(ch: Channel, method: str, req: betterproto.Message, reply: type,
               ns: str | None = NS, service: str = IMAGES) -> Any:
    try:
        async with ch.request(service + method, Cardinality.UNARY_UNARY, type(req), reply,
                              metadata=md(ns)) as st:
            await st.send_message(req, end=True)
            return await st.recv_message()
    except GRPCError as e:
        return (e.status.name, e.message)


async def write_blob(ch: Channel, data: bytes) -> str:
    """Commit ``data`` through a Write session (the Content API, as ctr ingest does)."""
    async with ch.request(CONTENT + "Write", Cardinality.STREAM_STREAM,
                          capi.WriteContentRequest, capi.WriteContentResponse,
                          metadata=md()) as st:
        await st.send_message(capi.WriteContentRequest(
            action=capi.WriteAction.COMMIT, ref="blob", data=data, total=len(data),
            labels={"containerd.io/gc.root": "1"}), end=True)
        resp = await st.recv_message()
        async for _ in st:
            pass
    return resp.digest


def image(name: str, digest: str = D1, media: str = MANIFEST, size: int = 100,
          labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
          ) -> iapi.Image:
    return iapi.Image(name=name, labels=labels or {}, target=Descriptor(
        media_type=media, digest=digest, size=size, annotations=annotations or {}))


def view(r: Any) -> Any:
    """An image reply without its timestamps (whether they are set and equal is kept)."""
    if isinstance(r, tuple):
        return r
    img = r.image
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return (img.name, sorted(img.labels.items()), img.target.media_type, img.target.digest,
            img.target.size, sorted(img.target.annotations.items()),
            img.created_at != epoch, img.created_at == img.updated_at)


def api_scenario(d: daemons.Daemon) -> list[Any]:
    async def run(ch: Channel) -> list[Any]:
        seen: list[Any] = []

        async def create(img: iapi.Image, ns: str | None = NS) -> None:
            seen.append(view(await call(ch, "Create", iapi.CreateImageRequest(image=img),
                                        iapi.CreateImageResponse, ns)))

        async def update(img: iapi.Image, paths: list[str] | None) -> None:
            req = iapi.UpdateImageRequest(image=img)
            if paths is not None:
                req.update_mask = FieldMask(paths=paths)
            seen.append(view(await call(ch, "Update", req, iapi.UpdateImageResponse)))

        async def names(*filters: str) -> None:
            r = await call(ch, "List", iapi.ListImagesRequest(filters=list(filters)),
                           iapi.ListImagesResponse)
            seen.append(r if isinstance(r, tuple) else [i.name for i in r.images])

        await create(image("docker.io/library/app:1", labels={"tier": "web", "gone": ""},
                           annotations={"org.opencontainers.image.ref.name": "1"}))
        await create(image("docker.io/library/app:1"))
        await create(image("B", D2, INDEX, 7, labels={"tier": "db"}))
        await create(image("a"))
        await create(image(""))
        await create(image("x", ""))
        await create(image("x", "sha256:abc"))
        await create(image("x", "md5:" + "0" * 32))
        await create(image("x", size=0))
        await create(image("x", media=""))
        await create(image("x", labels={"k": "v" * 4096}))
        await create(image("x"), ns=None)
        await create(image("x"), ns="Bad_Namespace")
        await names()
        await names("name==a")
        await names(f"target.digest=={D2}")
        await names(f'target.mediatype=="{MANIFEST}"')
        await names("labels.tier")
        await names("labels.tier==db", "name==a")
        await names('annotations."org.opencontainers.image.ref.name"==1')
        await names("name==")
        seen.append(view(await call(ch, "Get", iapi.GetImageRequest(name="B"),
                                    iapi.GetImageResponse)))
        seen.append(await call(ch, "Get", iapi.GetImageRequest(name="nope"),
                               iapi.GetImageResponse))
        await update(image("a", labels={"x": "1", "y": "2"}), ["labels.x"])
        await update(image("a", labels={"z": "3"}), ["labels"])
        await update(image("a", labels={"z": ""}), ["labels.z"])
        await update(image("a", annotations={"n": "1"}), ["annotations.n"])
        await update(image("a", annotations={"m": "2"}), ["annotations"])
        await update(image("a", D2, INDEX, 9), ["target"])
        await update(image("a"), ["name"])
        await update(image("a", size=0), ["target"])
        await update(image("a", D1, labels={"all": "new"}), None)
        await update(image(""), ["labels"])
        await update(image("missing"), ["labels"])
        for name in ("a", "a"):
            r = await call(ch, "Delete", iapi.DeleteImageRequest(name=name), Empty)
            seen.append(r if isinstance(r, tuple) else "deleted")
        await names()
        return seen

    return grpc(d, run)


def test_images_api_matches_containerd(berthd: daemons.Daemon,
                                       containerd: daemons.Daemon) -> None:
    ours, theirs = api_scenario(berthd), api_scenario(containerd)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"step {i}: berth {a!r} != containerd {b!r}"
    assert ours[0][1] == [("tier", "web")] and ours[0][6:] == (True, True)
    assert ours[1] == ("ALREADY_EXISTS", 'image "docker.io/library/app:1": already exists')
    assert ours[4] == ("INVALID_ARGUMENT", "Image.Name required")
    assert ours[13] == ["B", "a", "docker.io/library/app:1"]


def ctr_scenario(d: daemons.Daemon) -> list[Any]:
    async def setup(ch: Channel) -> None:
        for img in (image("example.com/one:1", labels={"b": "2", "a": "1"}),
                    image("example.com/two:2", D2, INDEX, 5)):
            r = await call(ch, "Create", iapi.CreateImageRequest(image=img),
                           iapi.CreateImageResponse)
            assert not isinstance(r, tuple), r

    grpc(d, setup)
    seen: list[Any] = []
    p = ctr(d, "images", "ls", "-q")
    seen.append((p.returncode, p.stdout))
    # Sizes and platforms come from content that is not there: both columns show it.
    p = ctr(d, "images", "ls")
    seen.append((p.returncode, p.stdout))
    p = ctr(d, "images", "ls", "-q", "labels.a==1")
    seen.append(p.stdout)
    p = ctr(d, "images", "label", "example.com/two:2", "k=v", "w=x")
    seen.append((p.returncode, sorted(p.stdout.strip().split(","))))
    p = ctr(d, "images", "label", "example.com/two:2", "k=")
    seen.append((p.returncode, p.stdout))
    p = ctr(d, "images", "label", "--replace-all", "example.com/one:1", "only=this")
    seen.append((p.returncode, p.stdout))
    p = ctr(d, "images", "label", "example.com/none:1", "k=v")
    seen.append((p.returncode, p.stderr))
    p = ctr(d, "images", "rm", "example.com/one:1", "example.com/none:1")
    seen.append((p.returncode, p.stdout, "image not found" in p.stderr))
    p = ctr(d, "images", "ls", "-q")
    seen.append(p.stdout)
    p = ctr(d, "images", "rm", "--sync", "example.com/two:2")
    seen.append((p.returncode, p.stdout))
    seen.append(ctr(d, "images", "ls", "-q").stdout)
    return seen


def test_ctr_images_ls_label_rm(berthd: daemons.Daemon, containerd: daemons.Daemon) -> None:
    ours, theirs = ctr_scenario(berthd), ctr_scenario(containerd)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"step {i}: berth {a!r} != containerd {b!r}"
    assert ours[0] == (0, "example.com/one:1\nexample.com/two:2\n")
    assert "a=1,b=2" in ours[1][1]
    assert ours[3] == (0, ["k=v", "w=x"])
    assert ours[5] == (0, "only=this\n")
    assert ours[7] == (0, "example.com/one:1\n", True)
    assert ours[-1] == ""


def events_scenario(d: daemons.Daemon) -> list[Any]:
    async def run(ch: Channel) -> list[Any]:
        queue: asyncio.Queue[eapi.Envelope] = asyncio.Queue()
        async with ch.request("/containerd.services.events.v1.Events/Subscribe",
                              Cardinality.UNARY_STREAM, eapi.SubscribeRequest, eapi.Envelope,
                              metadata={}) as st:
            await st.send_message(eapi.SubscribeRequest(
                filters=[f'namespace=={NS},topic~="^/(images|content)/"']), end=True)

            async def pump() -> None:
                async for env in st:
                    queue.put_nowait(env)

            pumping = asyncio.ensure_future(pump())
            try:
                # The subscription is live once a probe's event comes through.
                deadline = time.monotonic() + HANG_GUARD
                n = 0
                while queue.empty():
                    assert time.monotonic() < deadline, "no event ever arrived"
                    n += 1
                    await call(ch, "Create", iapi.CreateImageRequest(
                        image=image(f"probe{n}")), iapi.CreateImageResponse)
                    await asyncio.sleep(0.1)
                while True:  # drop the probes' events, up to the last probe's
                    env = await asyncio.wait_for(queue.get(), HANG_GUARD)
                    if iapi.ImageCreate().parse(env.event.value).name == f"probe{n}":
                        break
                await call(ch, "Create", iapi.CreateImageRequest(
                    image=image("ev", labels={"l": "1"})), iapi.CreateImageResponse)
                upd = iapi.UpdateImageRequest(image=image("ev", labels={"m": "2"}),
                                              update_mask=FieldMask(paths=["labels.m"]))
                await call(ch, "Update", upd, iapi.UpdateImageResponse)
                await call(ch, "Delete", iapi.DeleteImageRequest(name="ev"), Empty)
                digest = await write_blob(ch, b"event me")
                r = await call(ch, "Delete", capi.DeleteContentRequest(digest=digest), Empty,
                               service=CONTENT)
                assert not isinstance(r, tuple), r
                got = [await asyncio.wait_for(queue.get(), HANG_GUARD) for _ in range(4)]
            finally:
                pumping.cancel()
                await st.cancel()
        out = []
        for env in got:
            cls = {"/images/create": iapi.ImageCreate, "/images/update": iapi.ImageUpdate,
                   "/images/delete": iapi.ImageDelete,
                   "/content/delete": ContentDelete}[env.topic]
            msg = cls().parse(env.event.value)
            out.append((env.namespace, env.topic, env.event.type_url, msg.to_dict()))
        return out

    return grpc(d, run)


def test_image_events_match(berthd: daemons.Daemon, containerd: daemons.Daemon) -> None:
    ours, theirs = events_scenario(berthd), events_scenario(containerd)
    assert ours == theirs
    assert [e[1] for e in ours] == ["/images/create", "/images/update", "/images/delete",
                                    "/content/delete"]
    assert ours[1][3] == {"name": "ev", "labels": {"l": "1", "m": "2"}}
    assert ours[3][2:] == ("containerd.events.ContentDelete",
                           {"digest": dg.from_bytes(b"event me")})
