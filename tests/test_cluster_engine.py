"""The engine's own tests again (webhooks and SKUs spread over buckets too), on a real
Redis Cluster of three masters.

The test functions are the single-node modules' own, collected here a second time,
where ``engine`` (and so ``shop``) runs on the cluster, and ``r``, the raw client
audit tests corrupt the store with, is a cluster client. Tests that read the Redis
by its single-node URL stay in their modules only.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dispatch.engine import Engine

from .conftest import make_config
from .test_aftersales import (  # noqa: F401
    test_best_rated_supplier_sells_first, test_concurrent_tickets_on_one_code_exactly_one_wins,
    test_exports_reconcile_with_ledgers_and_balances, test_interrupted_approval_is_finished_by_the_sweep,
    test_lease_expiry_is_an_event, test_manual_blacklist_parks_reserved_codes_when_they_come_back,
    test_stock_alerts_have_hysteresis, test_supplier_deposits_are_idempotent, test_ticket_refund_charges_the_supplier_and_refunds_the_buyer,
    test_ticket_refusals, test_ticket_rejected_changes_no_money, test_ticket_replacement_delivers_another_code)
from .test_audit import *  # noqa: F401,F403  every corruption, and the healthy shop it is made in
from .test_buckets import (  # noqa: F401
    test_a_spread_sku_sells_every_code_once, test_buckets_are_validated_and_changed_by_the_update_path,
    test_changing_buckets_loses_and_duplicates_nothing, test_reservations_return_to_their_bucket,
    test_pausing_a_spread_sku_stops_every_bucket, test_the_sweep_finishes_a_spread_order_where_it_began,
    test_void_park_and_tickets_across_buckets)
from .test_engine import (  # noqa: F401
    test_balance_and_credit_limit, test_concurrent_same_ref_makes_one_order, test_deliver_debits_and_returns_codes,
    test_import_dedupes_across_batches_and_skus, test_import_resend_adds_nothing, test_large_amounts_stay_exact,
    test_leases_expire_exactly_once, test_no_key_for_a_distributor_that_does_not_exist,
    test_one_order_twice_in_one_take_call, test_orders_are_private_and_paged, test_out_of_stock_changes_nothing_and_frees_the_ref,
    test_refusals, test_replay_and_conflict, test_reserve_confirm_cancel, test_scripts_survive_script_flush,
    test_sku_lifecycle_and_validation, test_tampered_ciphertext_is_refused, test_tier_prices,
    test_topup_is_idempotent_by_reference, test_void_batch)
from .test_subs import (  # noqa: F401
    test_a_parents_limits_are_a_ceiling_for_its_subs, test_a_sub_purchase_credits_every_ancestor_its_margin,
    test_audit_finds_margins_and_transfers_off, test_many_subs_buy_at_once_while_a_transfer_races_them,
    test_reservations_pay_margins_when_confirmed_and_refunds_take_them_back,
    test_suspending_a_parent_stops_its_subtree_and_allowed_is_a_ceiling)
from .test_webhooks import (  # noqa: F401
    hooks, receivers, test_distributor_isolation_and_admin_sees_everything, test_engine_events_end_to_end,
    test_failed_deliveries_are_listed_and_replayed, test_repump_never_duplicates_and_workers_never_overlap,
    test_retries_with_backoff_until_accepted, test_timeout_counts_as_a_failed_attempt)

pytestmark = pytest.mark.cluster


@pytest_asyncio.fixture
async def engine(flushed_cluster_url: str, tmp_path: os.PathLike[str]) -> AsyncIterator[Engine]:
    """An engine on the emptied cluster, no background sweep."""
    e = Engine(make_config(tmp_path, redis_url=flushed_cluster_url), sweep=False)
    await e.start()
    assert e.store.cluster
    yield e
    await e.close()


@pytest_asyncio.fixture
async def r(flushed_cluster_url: str, redis_cluster) -> AsyncIterator[aioredis.RedisCluster]:
    """A raw cluster client: the way the audit tests' corruptions get in."""
    client = aioredis.RedisCluster(host="127.0.0.1", port=redis_cluster.masters[0].port)
    yield client
    await client.aclose()
