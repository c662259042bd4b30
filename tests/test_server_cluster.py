"""The daemon's API tests again, in-process on uvloop, with the engine on a real
Redis Cluster of three masters (``flushed_redis_url`` is the cluster's here)."""

from __future__ import annotations

import pytest

from .httpkit import make_server, server  # noqa: F401  (fixtures)
from .test_server_api import (  # noqa: F401
    test_admin_catalog_endpoints, test_distributors_see_only_their_own, test_health_openapi_and_metrics,
    test_import_void_and_export, test_order_refusals, test_order_replay_and_reads, test_reserve_confirm_cancel)
from .test_tiers import (  # noqa: F401
    test_a_pinned_distributor_is_not_moved, test_a_refund_counts_against_the_spend,
    test_buying_across_a_rule_moves_up_once_and_then_pays_the_tier_price,
    test_racing_buyers_and_deciders_tell_one_change, shop)

pytestmark = pytest.mark.cluster


@pytest.fixture
def flushed_redis_url(flushed_cluster_url: str) -> str:
    """The emptied cluster's ``redis+cluster://`` URL, for the daemon's engine."""
    return flushed_cluster_url
