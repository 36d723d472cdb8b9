"""``Bus.ensure_stream``: every service creates or checks the stream at start, possibly all at
once, possibly while a NATS cluster is still electing its leader (issue 14, item 8: an error
answer taken for "the stream exists" crashed the services of a fresh 3-node cluster)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ciretry.common.bus import Bus, PublishRefused
from ciretry.common.startup import endpoint, is_retryable_connect_error, wait_for
from tests.support.chaos.processes import NatsCluster


async def _connect(url: str, prefix: str) -> Bus:
    # As a service does: the servers were started a moment ago and may not listen yet.
    return await wait_for(
        endpoint("NATS", url),
        lambda: Bus.connect(url, prefix=prefix, stream=prefix.upper()),
        attempts=20,
        report=logging.getLogger(__name__).info,
        retryable=is_retryable_connect_error,
    )


@pytest.mark.parametrize("cluster_round", [1, 2, 3])  # a race: a few fresh clusters
async def test_services_starting_with_a_cluster_that_elects_its_leader(
    unique: str, cluster_round: int
) -> None:
    cluster = NatsCluster(3).start()
    buses: list[Bus] = []
    try:
        # No wait_jetstream(): nine services (three per node) start with the cluster.
        buses = list(
            await asyncio.gather(*(_connect(url, f"c{unique}") for url in cluster.urls * 3))
        )
        await asyncio.gather(*(b.ensure_stream(replicas=3) for b in buses))
        info = await buses[0].js.stream_info(buses[0].stream)
        assert info.config.num_replicas == 3
        assert info.config.subjects == [f"c{unique}.>"]
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        # A setting changed between two starts is an update, not an error, from any node.
        buses[4].duplicate_window = 30.0
        await buses[4].ensure_stream(replicas=3)
        info = await buses[2].js.stream_info(buses[2].stream)
        assert info.config.duplicate_window == 30.0
    finally:
        for b in buses:
            await b.close()
        cluster.stop()


async def test_many_services_at_once_on_one_server(nats_url: str, unique: str) -> None:
    buses = [await Bus.connect(nats_url, prefix=f"s{unique}", stream=f"S{unique}") for _ in range(6)]
    try:
        await asyncio.gather(*(b.ensure_stream() for b in buses))
        info = await buses[0].js.stream_info(buses[0].stream)
        assert info.config.subjects == [f"s{unique}.>"]
        assert info.config.duplicate_window == 120.0
    finally:
        await buses[0].delete_stream()
        for b in buses:
            await b.close()


async def test_replicas_on_a_single_server_say_what_to_set(nats_url: str, unique: str) -> None:
    bus = await Bus.connect(nats_url, prefix=f"r{unique}", stream=f"R{unique}")
    try:
        with pytest.raises(PublishRefused, match="CIRETRY_NATS_STREAM_REPLICAS=1"):
            await bus.ensure_stream(replicas=3)
    finally:
        await bus.delete_stream()
        await bus.close()
